"""Grok-1 release format: file order, round trip, refusal of code in pickles, broken folders."""

from __future__ import annotations

import os
import pickle
import pickletools
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import jax
import ml_dtypes
import numpy as np
import pytest
from grok1_fixtures import release_pickle_bytes, write_grok1_checkpoint

from grok.errors import CheckpointError, ConfigError, UnsafePickleError
from grok.grok1 import (
    QuantizedWeight8bit,
    dequantize,
    grok1_hf_shapes,
    grok1_leaves,
    iter_grok1_tensors,
    load_release_pickle,
    read_grok1_checkpoint,
    release_file_name,
)
from grok.presets import GROK1, TINY_GROK1, TINY_GROK2

CONFIG = TINY_GROK1  # D 64, N 4, K 2, H 16, E 8, Fe 48, L 2, V 256


def random_hf_tensors(config=CONFIG, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: rng.standard_normal(shape).astype(np.float32)
        for name, shape in grok1_hf_shapes(config).items()
    }


@pytest.fixture
def ckpt(tmp_path):
    tensors = random_hf_tensors()
    directory = tmp_path / "ckpt-0"
    write_grok1_checkpoint(directory, CONFIG, tensors)
    return directory, tensors


def leaf_named(hf_name: str, config=CONFIG):
    (leaf,) = [leaf for leaf in grok1_leaves(config) if hf_name in leaf.hf_shapes()]
    return leaf


# The tree and its order.


def test_full_grok1_tree_has_770_files_with_the_release_shapes():
    leaves = grok1_leaves(GROK1)
    assert len(leaves) == 770
    assert [leaf.index for leaf in leaves] == list(range(770))
    by_path = {leaf.path: leaf for leaf in leaves}
    layer = "transformer/decoder_layer_0"
    assert by_path["language_model/in_out_embed/embeddings"].shape == (131072, 6144)
    assert by_path[f"{layer}/multi_head_attention/query/w"].shape == (6144, 6144)
    assert by_path[f"{layer}/multi_head_attention/key/w"].shape == (6144, 1024)
    assert by_path[f"{layer}/moe/linear/w"].shape == (8, 6144, 32768)
    assert by_path[f"{layer}/moe/linear_1/w"].shape == (8, 32768, 6144)
    assert by_path[f"{layer}/router/w"].shape == (6144, 8)
    # File sizes seen in the release: tensor00001 and tensor00009 are [6144] float32 norms,
    # tensor00004 is the 1.6 GB int8 expert tensor.
    assert leaves[1].path == "language_model/rms_norm/scale"
    assert leaves[9].path == f"{layer}/rms_norm/scale"
    assert leaves[4].path == f"{layer}/moe/linear_v/w" and leaves[4].quantized
    assert sum(int(np.prod(leaf.shape)) for leaf in leaves) == 315_684_820_992


def test_file_order_is_jax_flatten_order_of_the_haiku_dict():
    config = CONFIG.replace(num_hidden_layers=12)
    leaves = grok1_leaves(config)
    params: dict[str, dict[str, Any]] = {}
    for leaf in reversed(leaves):  # insertion order must not matter
        params.setdefault(leaf.module, {})[leaf.param] = jax.ShapeDtypeStruct(leaf.shape, "f4")
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    jax_order = [f"{path[0].key}/{path[1].key}" for path, _ in flat]
    assert jax_order == [leaf.path for leaf in leaves]
    layers_in_file_order = [leaf.module.split("/")[1] for leaf in leaves[2::12]]
    assert layers_in_file_order[:4] == [
        "decoder_layer_0",
        "decoder_layer_1",
        "decoder_layer_10",
        "decoder_layer_11",
    ]
    prefix = "transformer/decoder_layer_0/"
    assert [leaf.path.removeprefix(prefix) for leaf in leaves[2:14]] == [
        "moe/linear/w",
        "moe/linear_1/w",
        "moe/linear_v/w",
        "multi_head_attention/key/w",
        "multi_head_attention/linear/w",
        "multi_head_attention/query/w",
        "multi_head_attention/value/w",
        "rms_norm/scale",
        "rms_norm_1/scale",
        "rms_norm_2/scale",
        "rms_norm_3/scale",
        "router/w",
    ]


def test_configs_the_release_cannot_fill_are_refused():
    with pytest.raises(ConfigError, match="residual_moe"):
        grok1_leaves(TINY_GROK2)
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        grok1_leaves(CONFIG.replace(tie_word_embeddings=False))


# Round trip.


def test_round_trip_quantized(ckpt):
    directory, tensors = ckpt
    out = read_grok1_checkpoint(directory, CONFIG)
    assert set(out) == set(tensors)
    for name, value in out.items():
        expected_shape = tensors[name].shape
        if name.endswith(("norm.weight", "embed_tokens.weight", "gate.weight")):
            assert isinstance(value, np.ndarray) and value.dtype == np.float32
            np.testing.assert_array_equal(value, tensors[name])  # stored as is
            continue
        assert isinstance(value, QuantizedWeight8bit), name
        assert value.weight.dtype == np.int8 and value.weight.shape == expected_shape
        assert value.scales.dtype == ml_dtypes.bfloat16
        out_dim, in_dim = expected_shape
        # o_proj and w2 have their input axis sharded 8 ways in the release.
        blocks = 8 if name.endswith(("o_proj.weight", "w2.weight")) else 1
        assert value.scales.shape == (out_dim, blocks), name
        # Quantisation error is at most half a step of the row's scale.
        step = np.repeat(value.scales.astype(np.float32), in_dim // blocks, axis=1)
        err = np.abs(dequantize(value) - tensors[name])
        assert np.all(err <= step / 2 + 1e-6), name


def test_dequantized_values_equal_the_writers_int8_times_scales(ckpt):
    directory, _ = ckpt
    out = read_grok1_checkpoint(directory, CONFIG)
    for hf_name in (
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.0.block_sparse_moe.experts.5.w1.weight",
        "model.layers.0.block_sparse_moe.experts.5.w2.weight",
    ):
        leaf = leaf_named(hf_name)
        raw = load_release_pickle(directory / leaf.file_name)  # [E?, in, out] as stored
        assert isinstance(raw, QuantizedWeight8bit)
        weight, scales = raw.weight, raw.scales
        if leaf.per_expert:
            weight, scales = weight[5], scales[5]
        rows_per_scale = weight.shape[0] // scales.shape[0]
        full_scales = np.repeat(scales.astype(np.float32), rows_per_scale, axis=0)
        expected = (weight.astype(np.float32) * full_scales).T  # [out, in]
        np.testing.assert_array_equal(dequantize(out[hf_name]), expected)
        np.testing.assert_array_equal(
            dequantize(out[hf_name], ml_dtypes.bfloat16),
            (weight.astype(ml_dtypes.bfloat16) * scales.repeat(rows_per_scale, axis=0)).T,
        )


def test_round_trip_unquantized_is_exact(tmp_path):
    tensors = random_hf_tensors(seed=1)
    write_grok1_checkpoint(tmp_path, CONFIG, tensors, quantize=False)
    out = read_grok1_checkpoint(tmp_path, CONFIG)
    assert set(out) == set(tensors)
    for name, value in out.items():
        assert isinstance(value, np.ndarray) and value.flags.c_contiguous
        np.testing.assert_array_equal(value, tensors[name])


def test_parent_folder_with_ckpt_0_is_accepted(ckpt):
    directory, tensors = ckpt
    out = read_grok1_checkpoint(directory.parent, CONFIG)
    np.testing.assert_array_equal(out["model.norm.weight"], tensors["model.norm.weight"])


@dataclass
class _ReleaseQuantizedWeight8bit:  # the release's model.QuantizedWeight8bit
    weight: Any
    scales: Any


def test_the_releases_own_loader_reads_written_files(ckpt, monkeypatch):
    directory, _ = ckpt
    # The release's checkpoint.py does this, then calls pickle.load on each file.
    monkeypatch.setattr(
        sys.modules["__main__"], "QuantizedWeight8bit", _ReleaseQuantizedWeight8bit, raising=False
    )
    leaf = leaf_named("model.layers.0.self_attn.o_proj.weight")
    with open(directory / leaf.file_name, "rb") as f:
        plain = pickle.load(f)
    ours = load_release_pickle(directory / leaf.file_name)
    assert isinstance(plain, _ReleaseQuantizedWeight8bit)
    np.testing.assert_array_equal(plain.weight, ours.weight)
    np.testing.assert_array_equal(plain.scales, ours.scales)
    assert plain.weight.shape == (64, 64) and plain.scales.shape == (8, 64)


def test_written_pickles_reference_only_the_release_globals(ckpt):
    directory, _ = ckpt
    globals_seen = set()
    for leaf in grok1_leaves(CONFIG):
        stack: list = []
        memo: dict = {}
        for op, arg, _ in pickletools.genops((directory / leaf.file_name).read_bytes()):
            if op.name == "SHORT_BINUNICODE":
                stack.append(arg)
            elif op.name == "MEMOIZE" and stack:
                memo[len(memo)] = stack[-1]
            elif op.name == "BINGET":
                stack.append(memo.get(arg))
            elif op.name == "STACK_GLOBAL":
                globals_seen.add(f"{stack[-2]}.{stack[-1]}")
            elif op.name == "MEMOIZE":
                memo[len(memo)] = None
    assert globals_seen == {
        "__main__.QuantizedWeight8bit",
        "numpy.core.multiarray._reconstruct",
        "numpy.ndarray",
        "numpy.dtype",
        "ml_dtypes.bfloat16",
    }


def test_iteration_reads_one_file_at_a_time(ckpt):
    directory, _ = ckpt
    leaves = grok1_leaves(CONFIG)
    (directory / leaves[-1].file_name).write_bytes(b"\x80\x04")  # break only the last file
    seen = []
    with pytest.raises(CheckpointError, match=leaves[-1].file_name):
        for name, _ in iter_grok1_tensors(directory, CONFIG):
            seen.append(name)
    assert seen[0] == "model.embed_tokens.weight"
    assert len(seen) == len(grok1_hf_shapes(CONFIG)) - 1  # everything but the last router


# Code in pickles is refused, never run.

recorded_calls: list[str] = []


def _record_call(tag: str) -> None:
    recorded_calls.append(tag)


class _Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: str) -> dict[str, bytes]:
    touch = f"open({marker!r}, 'w').close()"
    return {
        "os.system": pickle.dumps(_Payload(os.system, f"touch {marker}"), protocol=4),
        "builtins.eval": pickle.dumps(_Payload(eval, touch), protocol=0),  # GLOBAL opcode
        "builtins.exec": pickle.dumps(_Payload(exec, touch), protocol=2),
        "subprocess.call": pickle.dumps(_Payload(subprocess.call, ["touch", marker]), protocol=4),
        # Behind an allowed numpy array, as a second leaf of a tuple.
        "after numpy": pickle.dumps((np.zeros(3), _Payload(eval, touch)), protocol=4),
        "test function": pickle.dumps(_Payload(_record_call, marker), protocol=4),
    }


REFUSED_NAME = {
    "os.system": "system",
    "builtins.eval": "eval",
    "builtins.exec": "exec",
    "subprocess.call": "subprocess.call",
    "after numpy": "builtins.eval",
    "test function": "_record_call",
}


@pytest.mark.parametrize("kind", sorted(REFUSED_NAME))
def test_code_in_a_pickle_is_refused_and_not_run(tmp_path, kind):
    # The same payload run by plain pickle does act: it makes the marker (or records a call).
    control = str(tmp_path / "control-marker")
    recorded_calls.clear()
    pickle.loads(_payloads(control)[kind])
    assert os.path.exists(control) or recorded_calls == [control]

    marker = str(tmp_path / "marker")
    recorded_calls.clear()
    directory = tmp_path / "ckpt-0"
    write_grok1_checkpoint(directory, CONFIG, random_hf_tensors())
    target = directory / release_file_name(0)
    target.write_bytes(_payloads(marker)[kind])
    with pytest.raises(UnsafePickleError) as info:
        read_grok1_checkpoint(directory, CONFIG)
    message = str(info.value)
    assert str(target) in message and REFUSED_NAME[kind] in message
    assert not os.path.exists(marker)
    assert recorded_calls == []


def test_persistent_ids_are_refused(tmp_path):
    path = tmp_path / "tensor00000_000"
    path.write_bytes(b"\x80\x04\x8c\x04evil\x94Q.")  # BINPERSID
    with pytest.raises(UnsafePickleError, match="opcode BINPERSID at byte 9 is not part"):
        load_release_pickle(path)


def test_a_record_with_foreign_state_is_refused(tmp_path):
    qw = QuantizedWeight8bit(np.zeros((2, 2), np.int8), np.ones((1, 2), np.float32))
    data = release_pickle_bytes(qw).replace(b"\x8c\x06scales", b"\x8c\x06extras")
    path = tmp_path / "tensor00000_000"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="'extras'"):
        load_release_pickle(path)


# Broken folders.


def test_a_file_of_the_wrong_shape_is_named(ckpt):
    directory, _ = ckpt
    key = leaf_named("model.layers.1.self_attn.k_proj.weight")
    query = leaf_named("model.layers.1.self_attn.q_proj.weight")
    (directory / key.file_name).write_bytes((directory / query.file_name).read_bytes())
    with pytest.raises(CheckpointError) as info:
        read_grok1_checkpoint(directory, CONFIG)
    message = str(info.value)
    assert str(directory / key.file_name) in message
    assert "transformer/decoder_layer_1/multi_head_attention/key/w" in message
    assert "(64, 64)" in message and "expected (64, 32)" in message


def test_a_plain_tensor_of_the_wrong_shape_is_named(ckpt):
    directory, _ = ckpt
    norm = leaf_named("model.layers.0.post_moe_norm.weight")
    (directory / norm.file_name).write_bytes(release_pickle_bytes(np.ones(63, np.float32)))
    with pytest.raises(CheckpointError, match=rf"{norm.file_name}: .*rms_norm_3/scale.*\(63,\)"):
        read_grok1_checkpoint(directory, CONFIG)


def test_a_missing_file_is_named(ckpt):
    directory, _ = ckpt
    (directory / "tensor00003_000").unlink()
    with pytest.raises(CheckpointError, match="tensor00003_000: file missing"):
        read_grok1_checkpoint(directory, CONFIG)


def test_an_extra_file_is_named(ckpt):
    directory, _ = ckpt
    extra = release_file_name(len(grok1_leaves(CONFIG)))
    (directory / extra).write_bytes(release_pickle_bytes(np.ones(4, np.float32)))
    with pytest.raises(CheckpointError, match=f"{extra}: unexpected file"):
        read_grok1_checkpoint(directory, CONFIG)


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_a_truncated_pickle_is_named(ckpt, keep):
    directory, _ = ckpt
    path = directory / leaf_named("model.layers.0.block_sparse_moe.experts.0.w3.weight").file_name
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=f"{path.name}: unreadable pickle") as info:
        read_grok1_checkpoint(directory, CONFIG)
    assert not isinstance(info.value, UnsafePickleError)


def test_writer_refuses_incomplete_or_misshaped_input(tmp_path):
    tensors = random_hf_tensors()
    del tensors["model.layers.1.pre_moe_norm.weight"]
    with pytest.raises(CheckpointError, match="model.layers.1.pre_moe_norm.weight missing"):
        write_grok1_checkpoint(tmp_path, CONFIG, tensors)
    tensors = random_hf_tensors()
    tensors["model.layers.0.self_attn.v_proj.weight"] = np.zeros((64, 32), np.float32)
    with pytest.raises(CheckpointError, match=r"v_proj.weight has shape \(64, 32\), expected"):
        write_grok1_checkpoint(tmp_path, CONFIG, tensors)


def test_quantized_record_checks_its_block_rule():
    with pytest.raises(CheckpointError, match="axis 1 has 3 scales for 8 entries"):
        QuantizedWeight8bit(np.zeros((4, 8), np.int8), np.ones((4, 3), np.float32))
    with pytest.raises(CheckpointError, match="must be int8"):
        QuantizedWeight8bit(np.zeros((4, 8), np.int16), np.ones((4, 1), np.float32))
    qw = QuantizedWeight8bit(
        np.arange(8, dtype=np.int8).reshape(2, 4), np.array([[1.0, 10.0]], np.float32)
    )
    np.testing.assert_array_equal(dequantize(qw), [[0, 1, 20, 30], [4, 5, 60, 70]])
    np.testing.assert_array_equal(dequantize(qw.transpose()), dequantize(qw).T)
