"""FP8: reading float8 checkpoints (both scale conventions, TP ranks with their own scales)
and quantising bf16 weights to float8 at load time (``quantize="fp8"``)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import random_tensors, reference_logits

from grok.api import load_pretrained
from grok.checkpoint import hf_to_params, save_file
from grok.kernels import cpu
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
# TP slices of the experts on 128-input boundaries (Fe / 8 = 128): a tiled checkpoint's codes
# all load as they are; D = 160 leaves a partial block of inputs.
KEPT = BIG.replace(moe_intermediate_size=1024)
TOKENS = np.array([[3, 17, 255, 0, 42, 9, 77, 128], [7, 7, 100, 200, 1, 64, 5, 6]], np.int32)


def _quantize(w: np.ndarray, convention: str, which: int):
    """(q, scale tensor name suffix, scale) for one [out, in] tensor."""
    if convention == "block":
        q, s = quantize_blocks(w)
        return q, "_scale_inv", s
    if which % 3 == 2 or (convention == "shared" and which % 2):  # per tensor []
        q, s = quantize(w, "fp8")
        return q, "_scale", s
    q, s = quantize(w, "fp8", in_dims=(1,))  # [out, 1]
    return q, "_scale", s if which % 3 == 1 else s[:, 0]  # or [out]


def _dequantize(q, suffix, s):
    if suffix == "_scale_inv":
        return dequantize_blocks(q, s)
    return dequantize(q, s.reshape(-1, 1) if s.ndim else s)


def write_fp8_checkpoint(path, config, hf, convention):
    """A released-layout FP8 checkpoint; returns the numpy-dequantised tensors (stitched).

    ``convention``: "block" (128 x 128 tiles), "channel" (per tensor or channel, each TP
    slice quantised on its own), "shared" (per channel over the stitched rows, each TP slice
    of a column-split tensor carrying the same scales).
    """
    specs = {name: spec for spec in weight_specs(config) for _, name in spec.hf_names()}
    common, ranks, expected = {}, [{} for _ in range(TP)], {}
    for which, (name, w) in enumerate(sorted(hf.items())):
        spec = specs[name]
        if not spec.quantized:
            common[name] = w
            expected[name] = w
        elif convention == "shared" and spec.tp_dim is not None:
            q, s = quantize(w, "fp8", in_dims=(1,))  # [out, in], [out, 1]
            expected[name] = dequantize(q, s)
            for r, piece in enumerate(np.split(q, TP, axis=spec.tp_dim)):
                ranks[r][name] = np.ascontiguousarray(piece)
                ranks[r][name + "_scale"] = s if spec.tp_dim == 1 else np.split(s, TP)[r]
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
    the host path's bfloat16 bits exactly, on one device and on a (1, 8) mesh; on the host,
    the native library in the copy threads (the CPU backend's path) gives numpy's bits."""
    from grok.checkpoint import ReleasedCheckpoint, fp8
    from grok.kernels.cpu import host as native

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
    monkeypatch.setattr(native, "dequantize_fp8", lambda *args, **kwargs: None)
    numpy = loads()
    for got, want in zip(device + numpy, host + host, strict=True):
        for path, x in jax.tree_util.tree_leaves_with_path(want):
            y = got
            for key in path:
                y = y[key.key]
            assert x.dtype == y.dtype, path
            np.testing.assert_array_equal(
                x.view(f"u{x.dtype.itemsize}"), y.view(f"u{y.dtype.itemsize}"), err_msg=str(path)
            )


@pytest.mark.parametrize("quantize", [None, "fp8"])
@pytest.mark.parametrize("where", ["code", "scale"])
def test_fp8_nan_code_or_non_finite_scale_is_refused(tmp_path, hf_tensors, where, quantize):
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
        load_pretrained(tmp_path, dtype=jnp.bfloat16, quantize=quantize, quiet=True)


def _kept_exactly(model, want) -> None:
    """Every quantised matrix of ``model`` in ``want`` holds the checkpoint's values exactly
    (codes and scales kept as they are), its codes float8_e4m3fn."""
    for spec in weight_specs(model.config):
        if spec.quantized and spec.name in want[spec.module]:
            module = model.params[spec.module]
            q, scale = np.asarray(module[spec.name]), np.asarray(module[spec.name + "_scale"])
            assert q.dtype == jnp.float8_e4m3fn, spec.name
            got = dequantize(q, scale)
            np.testing.assert_array_equal(got, want[spec.module][spec.name], err_msg=spec.name)


@pytest.mark.parametrize(
    ("convention", "mode"), [("shared", "fp8"), ("channel", "fp8-block"), ("block", "fp8-block")]
)
def test_fp8_checkpoint_loads_as_fp8_and_its_logits_match_the_float64_reference(
    tmp_path, convention, mode
):
    """``quantize="fp8"`` keeps an FP8 checkpoint's codes and scales: per channel ("fp8")
    where every row has one scale, else (128 x 128 tiles, column-split slices with scales of
    their own) per row and 128 inputs ("fp8-block"). On one CPU device the native kernels
    read them: against the float64 reference of the dequantised weights, the logits are as
    close as those of the same weights dequantised to bfloat16 on XLA's path (the error is
    the bfloat16 activations')."""
    tensors = random_tensors(KEPT, 0)
    expected = write_fp8_checkpoint(tmp_path, KEPT, tensors, convention)
    model = load_pretrained(tmp_path, dtype=jnp.bfloat16, quantize="fp8", quiet=True)
    assert model.quant == mode
    assert isinstance(model.kernels, cpu.CpuKernels)
    _kept_exactly(model, hf_to_params(KEPT, expected, jnp.float32))
    want = reference_logits(KEPT, expected, TOKENS)

    def rel_rms(model) -> float:
        got = np.asarray(model.logits(TOKENS), np.float64)
        return float(np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2)))

    fp8, bf16 = rel_rms(model), rel_rms(load_pretrained(tmp_path, dtype=jnp.bfloat16, quiet=True))
    # Measured: fp8 1.0 / 4.8 / 3.8% rms, bf16 1.2 / 4.8 / 3.8% (the caps and routing of
    # these weights amplify bfloat16's rounding); a wrong scale layout moves them by tens of
    # percent.
    assert fp8 <= 1.05 * bf16 + 1e-3 and fp8 < 0.1, (fp8, bf16)


def test_fp8_checkpoint_kept_on_a_mesh_and_mixed_with_requantised_weights(tmp_path, hf_tensors):
    """On a (1, 8) mesh the codes are kept too. Where a weight's tiles do not sit on
    128-input boundaries of its stitched rows (w2's TP slices of 34 inputs), it alone is
    quantised again from its values; the rest keep their codes."""
    expected = write_fp8_checkpoint(tmp_path, BIG, hf_tensors(BIG, 6), "block")
    want = hf_to_params(BIG, expected, jnp.float32)
    model = load_pretrained(
        tmp_path, dtype=jnp.bfloat16, quantize="fp8", mesh=make_mesh(1, 8), quiet=True
    )
    assert model.quant == "fp8-block"
    w2 = want["grok/experts"].pop("w2")
    _kept_exactly(model, want)
    q, s = (np.asarray(model.params["grok/experts"][n]) for n in ("w2", "w2_scale"))
    err = np.abs(dequantize(q, s) - w2)
    assert err.max() > 0 and np.all(err <= 2.0**-4 * np.abs(w2) + np.repeat(s, 128, -1)[..., :272])


def test_fp8_block_quantizes_a_float_checkpoint_per_row_and_128_inputs(bf16_ckpt, hf_tensors):
    model = load_pretrained(
        bf16_ckpt, dtype=jnp.bfloat16, quantize="fp8-block", mesh=make_mesh(1, 8), quiet=True
    )
    assert model.quant == "fp8-block"
    ref = hf_to_params(SMALL, {k: v.astype(jnp.bfloat16) for k, v in hf_tensors(SMALL, 2).items()})
    for spec in weight_specs(SMALL):
        if spec.quantized:
            module = model.params[spec.module]
            q, s = quantize(ref[spec.module][spec.name], "fp8-block", spec.in_dims)
            np.testing.assert_array_equal(np.asarray(module[spec.name + "_scale"]), s)
            np.testing.assert_array_equal(
                np.asarray(module[spec.name]).view(np.uint8), q.view(np.uint8), err_msg=spec.name
            )
