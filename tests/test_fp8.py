"""FP8: reading float8 checkpoints (both scale conventions, TP ranks with their own scales)
and quantising bf16 weights to float8 at load time (``quantize="fp8"``)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok.api import load_pretrained
from grok.checkpoint import hf_to_params, save_file
from grok.params import weight_specs
from grok.presets import TINY_GROK2
from grok.quant import E4M3_MAX, dequantize, dequantize_blocks, quantize, quantize_blocks
from grok.sharding import make_mesh
from grok.testing import write_checkpoint

TP = 8
# Dims above the 128-wide FP8 blocks, so sharded regions cross block edges and ragged blocks.
BIG = TINY_GROK2.replace(
    hidden_size=160,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=20,
    intermediate_size=288,
    moe_intermediate_size=272,
    num_hidden_layers=1,
)
SMALL = TINY_GROK2.replace(num_attention_heads=8, head_dim=8, num_key_value_heads=2)
TOKENS = np.array([[3, 17, 255, 0, 42, 9, 77, 128], [7, 7, 100, 200, 1, 64, 5, 6]], np.int32)


def _quantize(w: np.ndarray, convention: str, which: int):
    """(q, scale tensor name suffix, scale) for one [out, in] tensor."""
    if convention == "block":
        q, s = quantize_blocks(w)
        return q, "_scale_inv", s
    if which % 3 == 2:  # per tensor []
        q, s = quantize(w, "fp8")
        return q, "_scale", s
    q, s = quantize(w, "fp8", in_dims=(1,))  # [out, 1]
    return q, "_scale", s if which % 3 == 1 else s[:, 0]  # or [out]


def _dequantize(q, suffix, s):
    if suffix == "_scale_inv":
        return dequantize_blocks(q, s)
    return dequantize(q, s.reshape(-1, 1) if s.ndim else s)


def write_fp8_checkpoint(path, config, hf, convention):
    """A released-layout FP8 checkpoint; returns the numpy-dequantised tensors (stitched)."""
    specs = {name: spec for spec in weight_specs(config) for _, name in spec.hf_names()}
    common, ranks, expected = {}, [{} for _ in range(TP)], {}
    for which, (name, w) in enumerate(sorted(hf.items())):
        spec = specs[name]
        if not spec.quantized:
            common[name] = w
            expected[name] = w
        elif spec.tp_dim is None:
            q, suffix, s = _quantize(w, convention, which)
            common[name], common[name + suffix] = q, s
            expected[name] = _dequantize(q, suffix, s)
        else:
            parts = []
            for r, piece in enumerate(np.split(w, TP, axis=spec.tp_dim)):
                q, suffix, s = _quantize(np.ascontiguousarray(piece), convention, which)
                ranks[r][name], ranks[r][name + suffix] = q, s  # each rank its own scales
                parts.append(_dequantize(q, suffix, s))
            expected[name] = np.concatenate(parts, axis=spec.tp_dim)
    save_file(path / "pytorch_model-00001-TP-common.safetensors", common)
    for r, part in enumerate(ranks):
        save_file(path / f"pytorch_model-{r + 2:05d}-TP-{r:03d}.safetensors", part)
    config.save(path / "config.json")
    return expected


@pytest.mark.parametrize("convention", ["channel", "block"])
@pytest.mark.parametrize("mesh_shape", [None, (2, 4)])
def test_fp8_checkpoint_loads_to_numpy_dequantised(tmp_path, hf_tensors, convention, mesh_shape):
    expected = write_fp8_checkpoint(tmp_path, BIG, hf_tensors(BIG, 1), convention)
    want = hf_to_params(BIG, expected, jnp.float32)
    mesh = make_mesh(*mesh_shape) if mesh_shape else None
    model = load_pretrained(tmp_path, dtype=jnp.float32, mesh=mesh, quiet=True)
    for spec in weight_specs(BIG):
        got = np.asarray(model.params[spec.module][spec.name])
        np.testing.assert_array_equal(got, want[spec.module][spec.name], err_msg=spec.name)


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory, hf_tensors):
    path = tmp_path_factory.mktemp("bf16")
    return write_checkpoint(path, SMALL, hf_tensors(SMALL, 2), tp=TP, dtype=jnp.bfloat16)


def test_quantize_keeps_float8_on_device_with_full_input_scales(bf16_ckpt, hf_tensors):
    model = load_pretrained(bf16_ckpt, dtype=jnp.bfloat16, mesh=make_mesh(1, 8), quantize="fp8")
    hf = {k: v.astype(jnp.bfloat16) for k, v in hf_tensors(SMALL, 2).items()}
    ref = hf_to_params(SMALL, hf, jnp.float32)
    for spec in weight_specs(SMALL):
        module = model.params[spec.module]
        if not spec.quantized:
            want = jnp.float32 if spec.float32 else jnp.bfloat16
            assert module[spec.name].dtype == want, spec.name
            continue
        q, scale = module[spec.name], module[spec.name + "_scale"]
        assert q.dtype == jnp.float8_e4m3fn and scale.dtype == jnp.float32, spec.name
        w = ref[spec.module][spec.name]
        amax = np.max(np.abs(w), axis=spec.in_dims, keepdims=True)
        np.testing.assert_allclose(np.asarray(scale), amax / E4M3_MAX, rtol=1e-6)
        deq = np.asarray(q).astype(np.float32) * np.asarray(scale)
        # e4m3 keeps 3 mantissa bits: each element within half an ulp, 2^-4 relative.
        assert np.all(np.abs(deq - w) <= 2.0**-4 * np.abs(w) + np.asarray(scale) * 2.0**-9)
    # o_proj's and w2's input dims are split over "model", yet their scales are whole-row.
    assert model.params["grok/experts"]["w2"].sharding.spec[3] == "model"  # [L, E, D, Fe]
    assert model.params["grok/experts"]["w2_scale"].sharding.spec[3] is None
    fp8_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(model.params))
    plain = load_pretrained(bf16_ckpt, dtype=jnp.bfloat16, quiet=True)
    assert fp8_bytes < 0.75 * sum(x.nbytes for x in jax.tree_util.tree_leaves(plain.params))


def test_quantized_logits_close_to_bf16(bf16_ckpt):
    plain = np.asarray(load_pretrained(bf16_ckpt, dtype=jnp.bfloat16, quiet=True).logits(TOKENS))
    fp8 = load_pretrained(bf16_ckpt, dtype=jnp.bfloat16, quantize="fp8", quiet=True)
    got = np.asarray(fp8.logits(TOKENS))
    rel_rms = np.sqrt(np.mean((got - plain) ** 2) / np.mean(plain**2))
    # Rounding to e4m3 perturbs each weight by up to 2^-4 relative (about 3.6% rms), and
    # with D = 64 little of that averages out; a perturbed router may also pick another
    # expert for a token. Measured: 6.0% rms. 10% leaves margin for that, yet a wrong scale
    # (off by a factor, or per shard instead of per row) moves the logits by tens of percent.
    assert rel_rms < 0.10, rel_rms
    assert rel_rms > 0  # it really ran through float8


def test_quantize_refuses_non_finite_weights(tmp_path, hf_tensors):
    from grok.errors import CheckpointError

    hf = hf_tensors(SMALL, 3)
    name = "model.layers.1.mlp.down_proj.weight"
    hf[name][5, 7] = np.inf
    path = write_checkpoint(tmp_path, SMALL, hf, tp=TP)
    with pytest.raises(CheckpointError, match=rf"{name}' holds a non-finite"):
        load_pretrained(path, dtype=jnp.float32, quantize="fp8", quiet=True)


@pytest.mark.parametrize("convention", ["channel", "block"])
def test_device_dequantising_matches_the_host_path_bit_for_bit(
    tmp_path, hf_tensors, convention, monkeypatch
):
    """FP8 codes dequantised on the device (whole, or a layer at a time where sharded) give
    the host path's bfloat16 bits exactly, on one device and on a (1, 8) mesh."""
    from grok.checkpoint import ReleasedCheckpoint, fp8

    config = BIG.replace(num_hidden_layers=2)
    write_fp8_checkpoint(tmp_path, config, hf_tensors(config, 4), convention)
    ckpt = ReleasedCheckpoint(tmp_path, config)
    assert all(
        fp8.device_scales(ckpt.files, ckpt.scales, s) is not None
        for s in weight_specs(config)
        if s.quantized
    )

    def loads():
        return [
            jax.tree_util.tree_map(np.asarray, load_pretrained(tmp_path, **kw, quiet=True).params)
            for kw in ({"dtype": jnp.bfloat16}, {"dtype": jnp.bfloat16, "mesh": make_mesh(1, 8)})
        ]

    monkeypatch.setattr(fp8, "on_device", lambda *args: True)  # as on accelerators
    device = loads()
    monkeypatch.setattr(fp8, "device_scales", lambda *args: None)
    host = loads()
    for got, want in zip(device, host, strict=True):
        for path, x in jax.tree_util.tree_leaves_with_path(want):
            y = got
            for key in path:
                y = y[key.key]
            assert x.dtype == y.dtype, path
            np.testing.assert_array_equal(
                x.view(f"u{x.dtype.itemsize}"), y.view(f"u{y.dtype.itemsize}"), err_msg=str(path)
            )


@pytest.mark.parametrize("where", ["code", "scale"])
def test_fp8_nan_code_or_non_finite_scale_is_refused(tmp_path, hf_tensors, where):
    from grok.errors import CheckpointError

    write_fp8_checkpoint(tmp_path, BIG, hf_tensors(BIG, 5), "block")
    name = "model.layers.0.self_attn.q_proj.weight"
    f = tmp_path / "pytorch_model-00001-TP-common.safetensors"
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    if where == "code":  # e4m3fn's NaN at [3, 130]
        info = header[name]
        at, value = 3 * info["shape"][1] + 130, b"\xff"
    else:  # an infinite scale for tile [1, 0]
        info = header[name + "_scale_inv"]
        assert info["dtype"] == "F32"
        at, value = 4 * info["shape"][1], np.float32(np.inf).tobytes()
    at += 8 + n + info["data_offsets"][0]
    data[at : at + len(value)] = value
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{name}' holds a non-finite"):
        load_pretrained(tmp_path, dtype=jnp.bfloat16, quiet=True)
