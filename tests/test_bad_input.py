"""Hostile input (issue 13, families 1-4): each gets the library's own error naming the file,
field or value; no code from a file runs; memory and time stay bounded; nothing silent.

The bounded-cost cases run in one child process whose address space may grow by at most
``CHILD_EXTRA_BYTES`` beyond what importing the library took, under a timeout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from grok1_fixtures import quantize_release, release_pickle_bytes

from grok.api import Model
from grok.config import GrokConfig
from grok.errors import (
    CheckpointError,
    ConfigError,
    GenerationError,
    TokenizerError,
    UnsafePickleError,
)
from grok.grok1 import grok1_leaves, load_release_pickle
from grok.presets import GROK2, TINY_GROK1, TINY_GROK2
from grok.tokenizer import V1_PAT_STR, TokJsonTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_EXTRA_BYTES = 1 << 30  # 1 GiB over the child's footprint after imports
CHILD_TIMEOUT_S = 120  # generous for a loaded 2-core machine; the cases take ~1 s together


# A few pickle opcodes, to write the crafted files byte by byte.
def _str(s: str) -> bytes:
    raw = s.encode()
    return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE


def _global(module: str, name: str) -> bytes:
    return _str(module) + _str(name) + b"\x93"  # STACK_GLOBAL


def _int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])  # BININT1
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


PROTO4 = b"\x80\x04"
F4_DTYPE = (
    _global("numpy", "dtype")
    + _str("f4")
    + b"\x89\x88\x87R"  # (code, False, True) REDUCE
    + b"("
    + _int(3)
    + _str("<")
    + b"NNN"
    + b"J\xff\xff\xff\xffJ\xff\xff\xff\xff"
    + _int(0)
    + b"tb"  # numpy's dtype state, BUILD
)
RECONSTRUCT = (
    _global("numpy.core.multiarray", "_reconstruct")
    + _global("numpy", "ndarray")
    + _int(0)
    + b"\x85C\x01b\x87R"  # (ndarray, (0,), b'b') REDUCE
)


def _array_ops(shape: tuple[int, ...], data: bytes, dtype: bytes = F4_DTYPE) -> bytes:
    """The opcodes numpy writes for one array; ``data`` pushes its bytes."""
    shape_ops = b"(" + b"".join(_int(n) for n in shape) + b"t"
    return RECONSTRUCT + b"(" + _int(1) + shape_ops + dtype + b"\x89" + data + b"tb"


def _binbytes(raw: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(raw)) + raw


def _array_pickle(shape: tuple[int, ...], raw: bytes, dtype: bytes = F4_DTYPE) -> bytes:
    """A numpy-shaped array pickle whose declared shape and bytes may disagree."""
    return PROTO4 + _array_ops(shape, _binbytes(raw), dtype) + b"."


# Family 1: pickles that only use admitted names but ask numpy for something unsafe.

_OBJECT_DTYPE = _global("numpy", "dtype") + _str("O") + b"\x89\x88\x87R"
# The reported exploit: a structured dtype with an object field, re-stated by BUILD so the
# field sits at offset 2**40, then an array of it filled through BUILD.
_STRUCTURED_AT_2_40 = (
    PROTO4
    + _global("numpy", "dtype")
    + _str("V8")
    + b"\x89\x88\x87R("
    + _int(3)
    + _str("|")
    + b"N"
    + _str("a")
    + b"\x85}"
    + _str("a")
    + _OBJECT_DTYPE
    + _int(2**40)
    + b"\x86s"
    + _int(8)
    + _int(1)
    + _int(63)
    + b"tb\x94"  # MEMOIZE the dtype as 0
    + RECONSTRUCT
    + b"("
    + _int(1)
    + b"("
    + _int(1)
    + b"th\x00\x89]"
    + _str("payload")
    + b"atb."
)

CRAFTED = {
    "structured dtype at offset 2**40": (_STRUCTURED_AT_2_40, CheckpointError, "'V8'"),
    "object dtype": (
        _array_pickle((3,), b"\0" * 24, _OBJECT_DTYPE + b"(" + _int(3) + _str("|") + b"tb"),
        CheckpointError,
        "'O' is not a plain numeric dtype",
    ),
    "big-endian float32": (
        _array_pickle((2,), b"\0" * 8, F4_DTYPE.replace(_str("<"), _str(">"))),
        CheckpointError,
        "state",
    ),
    "array never given its data": (PROTO4 + RECONSTRUCT + b".", CheckpointError, "never"),
    "shape larger than the bytes": (
        _array_pickle((1 << 40,), b"\0" * 16),
        CheckpointError,
        "needs 4398046511104 bytes, the file holds 16",
    ),
    "negative dimension": (_array_pickle((-4,), b""), CheckpointError, "non-negative"),
    "NEWOBJ of ndarray": (
        PROTO4 + _global("numpy", "ndarray") + b")\x81.",
        UnsafePickleError,
        "NEWOBJ",
    ),
    "INST opcode": (b"(ios\nsystem\n.", UnsafePickleError, "opcode INST"),
    "numpy.load by name": (PROTO4 + _global("numpy", "load") + b".", UnsafePickleError, "load"),
    "trailing bytes": (
        release_pickle_bytes(np.ones(2, np.float32)) + b"X",
        CheckpointError,
        "1 bytes follow",
    ),
}


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_crafted_pickles_are_refused_with_the_file_named(tmp_path, kind):
    data, error, match = CRAFTED[kind]
    path = tmp_path / "tensor00000_000"
    path.write_bytes(data)
    with pytest.raises(error) as info:
        load_release_pickle(path)
    assert type(info.value) is error
    assert str(path) in str(info.value) and match in str(info.value)


def test_every_protocol_numpy_writes_reads_back_exactly(tmp_path):
    path = tmp_path / "tensor00000_000"
    rng = np.random.default_rng(0)
    values = [
        rng.standard_normal((3, 5)).astype(np.float32),
        np.asfortranarray(rng.standard_normal((4, 6)).astype(np.float32)),
        rng.standard_normal(7).astype("bfloat16"),
        quantize_release(rng.standard_normal((16, 4)).astype(np.float32), 8),
    ]
    for protocol in (2, 3, 4, 5):
        for value in values:
            path.write_bytes(release_pickle_bytes(value, protocol=protocol))
            got = load_release_pickle(path)
            if isinstance(value, np.ndarray):
                assert got.dtype == value.dtype and got.flags.c_contiguous and got.flags.writeable
                np.testing.assert_array_equal(got, value)
            else:
                np.testing.assert_array_equal(got.weight, value.weight)
                np.testing.assert_array_equal(got.scales, value.scales)


def test_arrays_never_share_memory_even_when_the_memo_reuses_their_bytes(tmp_path):
    raw = np.arange(2**16, dtype=np.uint8).tobytes()  # large enough for an owned buffer
    i1 = F4_DTYPE.replace(_str("f4"), _str("i1")).replace(_str("<"), _str("|"))
    record = (
        PROTO4
        + _global("__main__", "QuantizedWeight8bit")
        + b")\x81}("
        + _str("weight")
        + _array_ops((2**14, 4), _binbytes(raw) + b"\x94", i1)  # MEMOIZE the bytes as 0
        + _str("scales")
        + _array_ops((2**14, 1), b"h\x00")  # BINGET 0: the same bytes again
        + b"ub."
    )
    path = tmp_path / "tensor00000_000"
    path.write_bytes(record)
    qw = load_release_pickle(path)
    assert qw.weight.tobytes() == raw and qw.scales.tobytes() == raw
    assert not np.shares_memory(qw.weight, qw.scales)
    assert qw.weight.flags.writeable and qw.scales.flags.writeable


def test_a_leaf_file_larger_than_its_tensor_can_be_is_refused_before_reading(tmp_path):
    (leaf,) = [x for x in grok1_leaves(TINY_GROK1) if x.path == "language_model/rms_norm/scale"]
    path = tmp_path / leaf.file_name
    path.write_bytes(release_pickle_bytes(np.ones(leaf.shape, np.float32)) + b"\0" * 10**6)
    with pytest.raises(
        CheckpointError, match=rf"{leaf.file_name}: file of 1000\d+ bytes is larger"
    ):
        load_release_pickle(path, leaf)
    # The record where the config expects a plain float array.
    record = quantize_release(np.ones((64, 8), np.float32), 1)
    path.write_bytes(release_pickle_bytes(record))
    (router,) = [x for x in grok1_leaves(TINY_GROK1) if x.path.endswith("_0/router/w")]
    with pytest.raises(CheckpointError, match="released as a float array, found a Quantized"):
        load_release_pickle(path, router)


# Families 1-2 in a child process: no crash, no payload, bounded memory and time.

_CHILD = textwrap.dedent(
    """
    import json, os, resource, sys, time
    sys.path.insert(0, {repo!r})
    import grok
    from grok.config import GrokConfig, load_config
    from grok.presets import GROK2
    from grok.grok1 import load_release_pickle

    with open("/proc/self/status") as f:
        vm = [int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize")][0]
    resource.setrlimit(resource.RLIMIT_AS, (vm + {extra}, vm + {extra}))
    cases = json.load(open(sys.argv[1]))
    results = {{}}
    for name, (kind, arg) in cases.items():
        start = time.perf_counter()
        try:
            if kind == "pickle":
                load_release_pickle(arg)
            elif kind == "config_file":
                load_config(arg)
            else:
                GrokConfig.from_dict({{**GROK2.to_dict(), **arg}})
            outcome = ["no error", ""]
        except grok.GrokError as err:
            outcome = [type(err).__name__, str(err)]
        except BaseException as err:
            outcome = ["escaped " + type(err).__name__, str(err)[:300]]
        results[name] = outcome + [time.perf_counter() - start]
    print(json.dumps(results))
    """
)


def _colliding_int_dict(entries: int) -> bytes:
    """A dict of int keys that all hash alike in CPython (k * (2**61 - 1))."""
    items = b"".join(_int(k * (2**61 - 1)) + b"N" for k in range(1, entries))
    return PROTO4 + b"}(" + items + b"u."


def test_bounded_cost_cases_in_a_memory_limited_child(tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    files = {
        "memo index 2**28": PROTO4 + b"Nr" + struct.pack("<I", 2**28) + b".",  # 11 bytes
        "object array of 3e8": _array_pickle(
            (300_000_000,), b"", _OBJECT_DTYPE + b"(" + _int(3) + _str("|") + b"tb"
        ),
        "colliding int keys": _colliding_int_dict(40_000),
        "bytes8 claiming 2**40": PROTO4 + b"\x8e" + struct.pack("<Q", 2**40) + b"abc.",
        "10**6 MARKs": PROTO4 + b"(" * 10**6 + b".",
        "os.system payload": pickle.dumps(Payload(), protocol=4),
        "exploit": _STRUCTURED_AT_2_40,
        "deep JSON": b"[" * 100_000,
        "5000-digit integer": b'{"vocab_size": ' + b"9" * 5000 + b"}",
    }
    cases: dict[str, list] = {}
    for name, data in files.items():
        path = tmp_path / name.replace(" ", "_").replace("*", "")
        path.write_bytes(data)
        cases[name] = [
            "config_file" if "JSON" in name or "integer" in name else "pickle",
            str(path),
        ]
    for field, value in [
        ("num_hidden_layers", 10**9),
        ("num_local_experts", 10**8),
        ("max_position_embeddings", 10**9),
        ("hidden_size", 10**12),
        ("vocab_size", 10**10),
    ]:
        cases[f"{field} {value}"] = ["config", {field: value}]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    script = _CHILD.format(repo=REPO, extra=CHILD_EXTRA_BYTES)
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "cases.json")],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    assert run.returncode == 0, run.stderr[-2000:]  # no segfault, no MemoryError abort
    results = json.loads(run.stdout.strip().splitlines()[-1])
    expected = {
        "memo index 2**28": ("CheckpointError", "found None"),
        "object array of 3e8": ("CheckpointError", "'O' is not a plain numeric dtype"),
        "colliding int keys": ("CheckpointError", "opcodes"),
        "bytes8 claiming 2**40": ("CheckpointError", "unreadable pickle"),
        "10**6 MARKs": ("CheckpointError", "opcodes"),
        "os.system payload": ("UnsafePickleError", "system"),
        "exploit": ("CheckpointError", "'V8'"),
        "deep JSON": ("ConfigError", "nested deeper"),
        "5000-digit integer": ("ConfigError", "not valid JSON"),
        "num_hidden_layers 1000000000": ("ConfigError", "'num_hidden_layers' must be <= 1024"),
        "num_local_experts 100000000": ("ConfigError", "'num_local_experts' must be <= 1024"),
        "max_position_embeddings 1000000000": ("ConfigError", "'max_position_embeddings'"),
        "hidden_size 1000000000000": ("ConfigError", "'hidden_size' must be <= 131072"),
        "vocab_size 10000000000": ("ConfigError", "'vocab_size' must be <="),
    }
    assert set(results) == set(expected)
    for name, (error, match) in expected.items():
        got_error, message, seconds = results[name]
        assert got_error == error and match in message, (name, got_error, message)
        if cases[name][0] != "config":
            assert cases[name][1] in message, (name, message)  # the file is named
        assert seconds < 10, (name, seconds)
    assert not marker.exists()


# Family 3: parser errors of config.json and tokenizer.tok.json are the library's own.

BAD_JSON_FILES = {
    "deep nesting": (b"[" * 100_000, "nested deeper than the parser allows"),
    "5000-digit integer": (b'{"a": ' + b"1" * 5000 + b"}", "not valid JSON"),
    "non-UTF-8": (b'{"a": "\xff\xfe"}', "not UTF-8 (byte 0xff at offset 7)"),
    "NaN literal": (b'{"rms_norm_eps": NaN}', "NaN is not a JSON number"),
    "truncated": (b'{"a": [1, 2', "not valid JSON"),
}


def _readers():
    return {
        "config": (GrokConfig.from_json_file, ConfigError),
        "tokenizer": (TokJsonTokenizer.from_file, TokenizerError),
    }


@pytest.mark.parametrize("reader", ["config", "tokenizer"])
@pytest.mark.parametrize("kind", sorted(BAD_JSON_FILES))
def test_unparseable_json_names_the_file(tmp_path, reader, kind):
    read, error = _readers()[reader]
    data, match = BAD_JSON_FILES[kind]
    path = tmp_path / "file.json"
    path.write_bytes(data)
    with pytest.raises(error) as info:
        read(path)
    assert type(info.value) is error
    assert str(path) in str(info.value) and match in str(info.value)


@pytest.mark.parametrize("reader", ["config", "tokenizer"])
def test_unreadable_paths_name_the_file(tmp_path, monkeypatch, reader):
    read, error = _readers()[reader]
    with pytest.raises(error, match=rf"{tmp_path}: is a directory, expected a"):
        read(tmp_path)
    path = tmp_path / "locked.json"
    path.write_text("{}")

    def denied(file, *args, **kwargs):  # chmod 000 does not stop root, so deny at open
        raise PermissionError(13, "Permission denied", os.fspath(file))

    monkeypatch.setattr("grok.jsonfile.open", denied, raising=False)
    with pytest.raises(error, match=rf"{path}: cannot read the .* \(Permission denied\)"):
        read(path)


def _tok_json(path, pat_str=None, regular_extra=(), special_id=256):
    data = {
        "regular_tokens": [{"bytes": [b], "token": b} for b in range(256)] + list(regular_extra),
        "special_tokens": [
            {"bytes": list(b"<|pad|>"), "token": special_id},
            {"bytes": list(b"<|eos|>"), "token": special_id + 1},
        ],
    }
    if pat_str is not None:
        data["pat_str"] = pat_str
    path.write_text(json.dumps(data))
    return path


BAD_PAT_STR = {
    "matches the empty string": ("a*", "matches the empty string"),
    "skips characters": (r"\w+", "does not cover the text"),
    "keeps only one letter": ("x", "does not cover the text"),
    "unbalanced": ("(", "not a valid split pattern"),
    "huge repeat": ("a{99999999}|.", "not a valid split pattern"),
    "too long": ("a|" * 6000 + ".", "more than 10000"),
}


@pytest.mark.parametrize("kind", sorted(BAD_PAT_STR))
def test_a_split_pattern_that_would_panic_or_drop_text_is_refused_at_load(tmp_path, kind):
    pat_str, match = BAD_PAT_STR[kind]
    path = _tok_json(tmp_path / "tokenizer.tok.json", pat_str)
    with pytest.raises(TokenizerError, match=match) as info:
        TokJsonTokenizer.from_file(path)
    assert str(path) in str(info.value)


def test_text_the_pattern_skips_raises_instead_of_vanishing(tmp_path):
    # Covers the load probe but not the snowman: tiktoken alone would drop it silently.
    path = _tok_json(tmp_path / "tokenizer.tok.json", "[^\u2603]+")
    tok = TokJsonTokenizer.from_file(path)
    assert tok.decode(tok.encode("plain text")) == "plain text"
    with pytest.raises(TokenizerError, match="does not cover the text"):
        tok.encode("a \u2603 b")
    # The V1 pattern covers everything.
    v1 = TokJsonTokenizer.from_file(_tok_json(tmp_path / "v1.tok.json", V1_PAT_STR))
    assert v1.decode(v1.encode("a \u2603 b")) == "a \u2603 b"


def test_an_empty_piece_at_encode_time_is_a_tokenizer_error_not_a_panic(tmp_path):
    # Covers the probe; at a snowman only the empty lookahead matches: tiktoken would panic.
    path = _tok_json(tmp_path / "tokenizer.tok.json", "[^\u2603]+|(?=\u2603)")
    tok = TokJsonTokenizer.from_file(path)
    with pytest.raises(TokenizerError, match="tiktoken failed|does not cover"):
        tok.encode("a\u2603")


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"bytes": [1, 2], "token": 2**32}, r"'token' must be an int in \[0, 2147483648\)"),
        ({"bytes": [1, 2], "token": 2**31}, r"'token' must be an int in \[0, 2147483648\)"),
        ({"bytes": [1, 2], "token": -1}, r"got -1"),
    ],
)
def test_token_ids_outside_int32_are_refused(tmp_path, entry, match):
    path = _tok_json(tmp_path / "tokenizer.tok.json", regular_extra=[entry])
    with pytest.raises(TokenizerError, match=match) as info:
        TokJsonTokenizer.from_file(path)
    assert str(path) in str(info.value)
    path = _tok_json(tmp_path / "special.tok.json", special_id=2**32)
    with pytest.raises(TokenizerError, match=r"special_tokens\[0\]"):
        TokJsonTokenizer.from_file(path)


# Family 4: numbers that would give NaN logits, and token ids that would be truncated.


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rms_norm_eps", float("nan")),
        ("attn_logit_softcapping", float("nan")),
        ("embedding_multiplier_scale", float("nan")),
        ("rope_theta", float("inf")),
        ("output_multiplier_scale", float("-inf")),
        ("beta_fast", float("nan")),
        ("attn_output_multiplier", float("inf")),
        ("scaling_factor", 10**400),
    ],
)
def test_non_finite_config_numbers_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"config field '{field}' must be a finite number"):
        GROK2.replace(**{field: value})
    with pytest.raises(ConfigError, match=rf"cfg\.json: config field '{field}'"):
        GrokConfig.from_dict({**GROK2.to_dict(), field: value}, source="cfg.json")


def test_infinite_json_number_is_refused_in_a_config_file(tmp_path):
    path = tmp_path / "config.json"
    text = json.dumps(GROK2.to_dict()).replace('"rope_theta": 208533496.0', '"rope_theta": 1e999')
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"{path}: config field 'rope_theta' must be a finite"):
        GrokConfig.from_json_file(path)


@pytest.fixture(scope="module")
def unloaded_model():
    """A model object whose inputs are checked before its (absent) parameters are used."""
    return Model(TINY_GROK2, {}, dtype=np.float32)


@pytest.mark.parametrize(
    ("tokens", "error", "match"),
    [
        ([[1.7, 2.9]], GenerationError, r"float64 values \(e\.g\. 1\.7\); ids are not rounded"),
        (np.array([[True, False]]), GenerationError, "must hold integer token ids"),
        ([[1, 256]], TokenizerError, r"token id 256 is outside the vocabulary \[0, 256\)"),
        ([[-1, 2]], TokenizerError, "token id -1 is outside"),
        ([[2**70]], TokenizerError, f"token id {2**70} is outside"),
        ([[1, 2], [3]], GenerationError, "rectangular"),
        ([1, 2, 3], GenerationError, r"must be \[B, T\] token ids, got shape \[3\]"),
        ("hello", GenerationError, "is text"),
        ([[0] * 129], GenerationError, "129 tokens, more than the context"),
    ],
)
def test_logits_refuses_tokens_it_would_truncate_or_misread(unloaded_model, tokens, error, match):
    with pytest.raises(error, match=match):
        unloaded_model.logits(tokens)


@pytest.mark.parametrize(
    ("prompts", "error", "match"),
    [
        ([[1.5, 2.0]], GenerationError, "prompt 0 must hold integer token ids"),
        ([[3], [1, 2**40]], TokenizerError, f"prompt 1: token id {2**40} is outside"),
        ([[3], [-7]], TokenizerError, "prompt 1: token id -7 is outside"),
        (np.array(5), GenerationError, r"prompts must be .* got an array of shape \(\)"),
        (np.array([1, 2]), GenerationError, r"prompts must be .* got an array of shape \(2,\)"),
        (7, GenerationError, "prompts must be a sequence of token-id sequences, got int"),
    ],
)
def test_generate_uses_the_same_check(unloaded_model, prompts, error, match):
    with pytest.raises(error, match=match):
        unloaded_model.generate(prompts, max_new_tokens=2)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"scaling_factor": 0.0}, "'scaling_factor' must be > 0 for rope_type 'yarn'"),
        ({"beta_fast": 0.0}, "'beta_fast' must be > 0 for rope_type 'yarn'"),
        ({"rope_theta": 1.0}, "'rope_theta' must be > 1 for rope_type 'yarn'"),
        ({"sliding_window_size": "4096"}, "'sliding_window_size' must be an int"),
        ({"final_logit_softcapping": 10**400}, "'final_logit_softcapping' must be a finite"),
    ],
)
def test_numbers_yarn_would_divide_by_or_cannot_compare_are_refused(changes, match):
    data = {**GROK2.to_dict(), "rope_type": "yarn", **changes}
    with pytest.raises(ConfigError, match=match):
        GrokConfig.from_dict(data, source="cfg.json")


@pytest.mark.parametrize("value", [["gelu"], {"gelu": 1}, 1, None])
def test_a_hidden_act_that_is_not_a_string_names_the_field(value):
    with pytest.raises(ConfigError, match=r"cfg\.json: field 'hidden_act' must be one of"):
        GrokConfig.from_dict({**GROK2.to_dict(), "hidden_act": value}, source="cfg.json")


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(GrokConfig)])
@pytest.mark.parametrize("value", [["x"], {"x": 1}, "x"], ids=["list", "dict", "str"])
def test_every_field_of_the_wrong_json_type_is_a_config_error(field, value):
    data = {**GROK2.to_dict(), field: value}
    try:
        GrokConfig.from_dict(data, source="cfg.json")
    except ConfigError as e:
        assert field in str(e)
