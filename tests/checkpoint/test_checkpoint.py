"""Loader errors: each damaged checkpoint gives a CheckpointError naming the file and tensor,
and nothing half-loaded is returned."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from grok.api import load_pretrained
from grok.checkpoint import ReleasedCheckpoint, read_header, save_file
from grok.errors import CheckpointError
from grok.presets import TINY_GROK2
from grok.testing import write_checkpoint

CONFIG = TINY_GROK2
EMBED = "model.embed_tokens.weight"
W1 = "model.layers.1.block_sparse_moe.experts.3.w1.weight"


@pytest.fixture
def ckpt(tmp_path, hf_tensors):
    return write_checkpoint(tmp_path / "ckpt", CONFIG, hf_tensors(CONFIG), tp=8)


def file_holding(path, name, rank_marker="common"):
    for f in sorted(path.glob(f"*-TP-{rank_marker}.safetensors")):
        if name in read_header(f):
            return f
    raise AssertionError(name)


def rewrite(f, change):
    """Rewrites safetensors file ``f`` with ``change(tensors)`` applied."""
    tensors = load_file(f)
    change(tensors)
    save_file(f, tensors)


def load(path):
    return load_pretrained(path, dtype=jnp.float32, quiet=True)


def test_intact_checkpoint_loads(ckpt, hf_tensors):
    model = load(ckpt)
    np.testing.assert_array_equal(
        np.asarray(model.params["grok"]["embed_tokens"]), hf_tensors(CONFIG)[EMBED]
    )


def test_missing_common_file(ckpt):
    f = file_holding(ckpt, EMBED)
    f.unlink()
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\).*"):
        load(ckpt)


def test_missing_tp_rank_in_the_middle(ckpt):
    next(ckpt.glob("*-TP-003.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"TP rank 3 is missing.*\*-TP-003\.safetensors"):
        load(ckpt)


def test_missing_last_tp_rank(ckpt):
    next(ckpt.glob("*-TP-007.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"w1.weight.*TP rank 7 is missing.*-TP-007\."):
        load(ckpt)


def test_truncated_file(ckpt):
    f = file_holding(ckpt, EMBED)
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=f.name):
        load(ckpt)


def test_header_that_does_not_parse(ckpt):
    f = file_holding(ckpt, EMBED)
    data = bytearray(f.read_bytes())
    data[8:20] = b"#not json!#{"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{f.name}.*not a valid safetensors file"):
        load(ckpt)


def test_wrong_shape(ckpt):
    f = file_holding(ckpt, EMBED)
    rewrite(f, lambda t: t.update({EMBED: t[EMBED][:, :32].copy()}))
    with pytest.raises(CheckpointError, match=rf"{f.name}.*{EMBED}.*\[256, 32\].*\[256, 64\]"):
        load(ckpt)


def test_wrong_dtype(ckpt):
    f = file_holding(ckpt, EMBED)
    rewrite(f, lambda t: t.update({EMBED: t[EMBED].astype(np.int32)}))
    with pytest.raises(CheckpointError, match=rf"{f.name}.*{EMBED}.*I32"):
        load(ckpt)


def test_missing_tensor(ckpt):
    f = file_holding(ckpt, EMBED)
    rewrite(f, lambda t: t.pop(EMBED))
    with pytest.raises(CheckpointError, match=rf"missing tensor\(s\) {EMBED}"):
        load(ckpt)


def test_duplicate_tensor(ckpt):
    f = file_holding(ckpt, EMBED)
    other = next(p for p in ckpt.glob("*-TP-common.safetensors") if p != f)
    embed = load_file(f)[EMBED]
    rewrite(other, lambda t: t.update({EMBED: embed}))
    with pytest.raises(CheckpointError, match=rf"{EMBED}.*appears in"):
        load(ckpt)


def test_unexpected_tensor(ckpt):
    rewrite(file_holding(ckpt, EMBED), lambda t: t.update({"model.extra": np.zeros(3)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.extra'"):
        load(ckpt)


def test_config_that_contradicts_the_weights(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["vocab_size"] = 512
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"{EMBED}.*\[256, 64\], expected \[512, 64\]"):
        load(ckpt)
    cfg["vocab_size"], cfg["moe_intermediate_size"] = 256, 64
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"w1.weight.*\[32, 64\] stitched.*\[64, 64\]"):
        load(ckpt)


def test_fp8_tensor_without_scale(ckpt):
    f = file_holding(ckpt, EMBED)
    rewrite(f, lambda t: t.update({EMBED: t[EMBED].astype(jnp.float8_e4m3fn)}))
    with pytest.raises(
        CheckpointError, match=rf"{f.name}.*{EMBED}.*needs exactly one of .*_scale.*found 0"
    ):
        load(ckpt)


def test_nothing_half_loaded(ckpt, monkeypatch):
    """A read failing midway deletes every array already built and raises."""
    built = []
    real_build = ReleasedCheckpoint.build

    def failing_build(self, param, *args, **kwargs):
        if len(built) == 5:
            raise CheckpointError(f"simulated read failure in {param.spec.hf_name}")
        built.append(real_build(self, param, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(ReleasedCheckpoint, "build", failing_build)
    with pytest.raises(CheckpointError, match="simulated read failure"):
        load(ckpt)
    assert len(built) == 5
    assert all(array.is_deleted() for array in built)


def write_header(f, header: bytes) -> None:
    """Replaces the header of ``f`` with ``header`` (the data bytes stay)."""
    f.write_bytes(len(header).to_bytes(8, "little") + header)


@pytest.mark.parametrize(
    "header",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 0]}}',
    ],
    ids=["deep-nesting", "huge-integer"],
)
def test_crafted_headers(ckpt, header):
    f = file_holding(ckpt, EMBED)
    write_header(f, header)
    with pytest.raises(CheckpointError, match=f"{f.name}.*not a valid safetensors file"):
        load(ckpt)


def test_bogus_scale_is_not_an_fp8_scale(ckpt):
    rewrite(file_holding(ckpt, EMBED), lambda t: t.update({"model.bogus_scale": np.ones(1)}))
    bogus = "unexpected tensor 'model.bogus_scale'.*not the scale"
    with pytest.raises(CheckpointError, match=bogus):
        load(ckpt)
    # The scale of a known weight that is not stored as FP8 is refused the same way.
    name = EMBED + "_scale"
    f = file_holding(ckpt, EMBED)
    rewrite(f, lambda t: (t.pop("model.bogus_scale"), t.update({name: np.ones(1)})))
    with pytest.raises(CheckpointError, match=f"unexpected tensor '{name}'.*not the scale"):
        load(ckpt)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weight_is_refused_unless_asked(ckpt, bad):
    f = next(ckpt.glob("*-TP-005.safetensors"))

    def poison(t):
        t[W1] = t[W1].copy()
        t[W1][2, 3] = bad

    rewrite(f, poison)
    with pytest.raises(CheckpointError, match=rf"{W1}.*non-finite"):
        load(ckpt)
    model = load_pretrained(ckpt, dtype=jnp.float32, quiet=True, check_finite=False)
    assert not np.all(np.isfinite(np.asarray(model.params["grok/experts"]["w1"])))


def test_writer_round_trips_float8_and_bfloat16_atomically(tmp_path):
    f = tmp_path / "x.safetensors"
    tensors = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3).astype(jnp.float8_e4m3fn),
        "b": np.ones((3,), jnp.bfloat16),
        "c": np.float32(2.5),
    }
    save_file(f, tensors)
    infos = read_header(f)
    assert {n: i.safetensors_dtype for n, i in infos.items()} == {
        "a": "F8_E4M3",
        "b": "BF16",
        "c": "F32",
    }
    assert infos["c"].shape == ()
    with pytest.raises(CheckpointError, match="x.safetensors: cannot write"):
        save_file(f, {"bad": np.array([object()])})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # no temp left
    assert read_header(f).keys() == infos.keys()  # the old file is intact


def test_nan_payload_is_caught_through_the_bfloat16_cast(tmp_path, hf_tensors):
    """A float32 NaN whose payload would round to 0 in bfloat16 is still refused."""
    hf = hf_tensors(CONFIG)
    hf[EMBED] = hf[EMBED].copy()
    hf[EMBED].view(np.uint32)[1, 2] = 0xFFFFFFFF  # NaN; + the rounding bias wraps to 0
    path = write_checkpoint(tmp_path / "ckpt", CONFIG, hf, tp=8)
    with pytest.raises(CheckpointError, match=rf"{EMBED}.*non-finite"):
        load_pretrained(path, dtype=jnp.bfloat16, quiet=True)
    ok = hf_tensors(CONFIG)
    path = write_checkpoint(tmp_path / "ok", CONFIG, ok, tp=8)
    model = load_pretrained(path, dtype=jnp.bfloat16, quiet=True)
    got = np.asarray(model.params["grok"]["embed_tokens"]).view(np.uint16)
    np.testing.assert_array_equal(got, ok[EMBED].astype(jnp.bfloat16).view(np.uint16))


@pytest.mark.parametrize(
    "dtype", [jnp.bfloat16, jnp.float16, jnp.float8_e4m3fn, jnp.float8_e5m2, np.float32, np.float64]
)
def test_finiteness_check_agrees_with_isfinite(dtype):
    """The loader's bit test against numpy's isfinite: every code of the 1- and 2-byte types,
    and the edges of float32 / float64, alone and in arrays longer than one check chunk."""
    from grok.checkpoint.finite import CHECK_CHUNK as _CHECK_CHUNK
    from grok.checkpoint.finite import all_finite as _finite

    dtype = np.dtype(dtype)
    if dtype.itemsize <= 2:
        values = np.arange(1 << (8 * dtype.itemsize), dtype=f"u{dtype.itemsize}").view(dtype)
    else:
        info = np.finfo(dtype)
        values = np.array([0, -0.0, info.max, -info.max, info.tiny, np.inf, -np.inf, np.nan], dtype)
        values = np.concatenate([values, -values])
    with np.errstate(invalid="ignore"):  # NaN codes cast
        finite = np.isfinite(values.astype(np.float64))
    assert (~finite).any() and finite.any()
    for value, want in zip(values, finite, strict=True):
        assert _finite(np.array([value])) == want, (dtype, value)
    long = np.zeros(_CHECK_CHUNK + 7, dtype)
    for value, want in zip(values[::61], finite[::61], strict=True):
        long[-1] = value  # in the second chunk
        assert _finite(long) == want, (dtype, value)
    long[-1] = values[~finite][0]
    assert not _finite(long)
    wide = np.zeros((_CHECK_CHUNK // 8 + 3, 16), dtype)  # a strided column block, as TP
    wide[-1, 9] = values[~finite][0]  # slices side by side give the check
    assert _finite(wide[:, :8]) and not _finite(wide[:, 8:])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mesh_shape", [None, (2, 4), (8, 1)])
def test_every_parameter_equals_the_stitched_tensors(ckpt, hf_tensors, mesh_shape, dtype):
    """Each parameter of a TP-8 float32 checkpoint, on one device (slices stitched side by
    side in rows and in columns) and on meshes (each device its own slices), equals the
    released tensors converted in memory (``hf_to_params``; bfloat16 by ml_dtypes' cast),
    bit for bit."""
    from grok.checkpoint import hf_to_params
    from grok.sharding import make_mesh

    mesh = make_mesh(*mesh_shape) if mesh_shape else None
    model = load_pretrained(ckpt, dtype=dtype, mesh=mesh, quiet=True)
    want = hf_to_params(CONFIG, hf_tensors(CONFIG), dtype)
    for module, tensors in want.items():
        for name, array in tensors.items():
            got = np.asarray(model.params[module][name])
            assert got.dtype == array.dtype, (module, name)
            np.testing.assert_array_equal(
                got.view(f"u{got.itemsize}"), array.view(f"u{array.itemsize}"), err_msg=name
            )
