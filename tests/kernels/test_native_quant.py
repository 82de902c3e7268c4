"""The native products of weights stored as 8-bit codes (``grok.kernels.cpu.quant_matvec`` and
``quant_grouped_matvec``, ``src/quant.cc``) and the loader's native helpers (``copy_checked``,
``dequantize_fp8``, ``src/host.cc``), against float64 numpy.

- the products against a float64 product of the dequantised weights, for every scale layout
  (per tensor and per channel as one scale per row, 128 x 128 tiles as the row blocks the
  loader keeps them in, per row and 128 inputs), e4m3 and int8, row counts below, at and
  above ``MAX_ROWS`` and prefill-sized ones (the packed panels), widths with tails, stacked
  weights read at traced and clamped indices;
- every e4m3 code (subnormals, 448, signed zero) exactly;
- the grouped product per group, groups without rows, rows past the sizes' total;
- the loader's helpers equal to its numpy path bit for bit, NaN codes and overflow counted.

They skip where the CPU lacks AVX512-BF16 or AVX512-VBMI (``cpu.available_codes``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from reference import rel_err

from grok.checkpoint import fp8
from grok.checkpoint.finite import NON_FINITE_FROM, all_finite
from grok.checkpoint.units import _to_bfloat16
from grok.kernels import cpu
from grok.kernels.cpu import host
from grok.quant import FP8_BLOCK, dequantize, quantize, quantize_blocks

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
needs_codes = pytest.mark.skipif(
    not cpu.available_codes(jnp.bfloat16, jnp.float8_e4m3fn),
    reason=f"no quantised kernels: {cpu.why_unavailable() or 'no AVX512-BF16 and AVX512-VBMI'}",
)
needs_library = pytest.mark.skipif(
    not host.available(), reason=f"no native library: {cpu.why_unavailable()}"
)
# The kernels' sums are float32 (products of bfloat16 inputs and exact code values): within
# float32 rounding of the largest output.
RTOL = 1e-5


def _x(rng, rows: int, i: int) -> jax.Array:
    return jnp.asarray(rng.standard_normal((rows, i)), jnp.bfloat16)


def _weights(rng, shape: tuple[int, ...], layout: str, codes: str = "fp8"):
    """(codes, kernel scale [..., O, 1 or G], float64 dequantised weight) of random weights
    quantised in ``layout``: "tensor", "channel", "rows" (per row and 128 inputs) or "tiles"
    (128 x 128, handed to the kernel as the loader keeps them: each tile's scale on its rows)."""
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.1, 10, (*shape[:-1], 1))
    kind = "int8" if codes == "int8" else "fp8"
    if layout == "tiles":
        q, tiles = zip(*(quantize_blocks(m, kind) for m in w.reshape(-1, *shape[-2:])), strict=True)
        q = np.stack(q).reshape(shape)
        rows = np.arange(shape[-2]) // FP8_BLOCK
        scale = np.stack([t[rows] for t in tiles]).reshape(*shape[:-1], -1)  # [..., O, G]
    elif layout == "rows":
        q, scale = quantize(w, "fp8-block" if kind == "fp8" else kind, in_dims=(w.ndim - 1,))
        if kind == "int8":
            raise ValueError("int8 has no row blocks")
    elif layout == "channel":
        q, scale = quantize(w, kind, in_dims=(w.ndim - 1,))
    else:
        q, s = quantize(w, kind)
        scale = np.full((*shape[:-1], 1), s, np.float32)
    want = dequantize(q, scale, np.float64)
    return jnp.asarray(q), jnp.asarray(scale, jnp.float32), want


# (O, I): tails in I (not a multiple of 64, or of 128 with several scales per row) and in O
# (not a multiple of 4); 300 x 260 spreads over the thread pool.
SHAPES = [(5, 7), (37, 200), (300, 260), (64, 128)]
# Below, at and above MAX_ROWS (more passes), and from the panel threshold on (prefill).
ROWS = [1, 3, 8, 9, 40, 70]


@needs_codes
@pytest.mark.parametrize("layout", ["tensor", "channel", "rows", "tiles"])
@pytest.mark.parametrize(("o", "i"), SHAPES)
def test_quant_matvec_matches_float64_every_layout(layout, o, i):
    rng = np.random.default_rng(o * i)
    q, scale, w = _weights(rng, (o, i), layout)
    for rows in ROWS:
        x = _x(rng, rows, i)
        got = cpu.quant_matvec(x, q, scale)
        assert rel_err(got, np.asarray(x, np.float64) @ w.T) <= RTOL, (layout, rows)


@needs_codes
@pytest.mark.parametrize("rows", [1, 8, 70])
def test_int8_codes_and_stacked_weights_at_traced_and_clamped_indices(rows):
    rng = np.random.default_rng(rows)
    q, scale, w = _weights(rng, (2, 3, 37, 200), "channel", codes="int8")
    assert q.dtype == jnp.int8
    x = _x(rng, rows, 200)
    call = jax.jit(lambda x, q, s, a, b: cpu.quant_matvec(x, q, s, (a, b)))
    for (a, b), (ra, rb) in [((1, 2), (1, 2)), ((5, -9), (1, 0))]:  # clamped as dynamic_slice
        got = call(x, q, scale, jnp.int32(a), jnp.int32(b))
        assert rel_err(got, np.asarray(x, np.float64) @ w[ra, rb].T) <= RTOL


@needs_codes
@pytest.mark.parametrize("codes", ["fp8", "int8"])
def test_every_code_exactly(codes):
    """Each of the 256 codes (e4m3: subnormals 0x01-0x07, 448 at 0x7e, -0 at 0x80; NaN
    0x7f/0xff left out, refused at load) times a power of two, in a row of its own, through
    the row kernels and the panels: exact, as the sums of exact products are here."""
    values = np.arange(256, dtype=np.uint8)
    if codes == "fp8":
        values = values[(values & 0x7F) != 0x7F]
        q = values.view(E4M3)
    else:
        q = values.view(np.int8)
    n = values.size
    w = np.zeros((n, 64), q.dtype)
    w[np.arange(n), np.arange(n) % 64] = q  # row c holds code c at input c % 64
    scale = np.full((n, 1), 0.25, np.float32)
    x = jnp.asarray(np.tile(2.0 ** (np.arange(64) % 8 - 4), (40, 1)), jnp.bfloat16)  # [40, 64]
    want = q.astype(np.float64) * 0.25 * (2.0 ** (np.arange(n) % 64 % 8 - 4))
    for rows in (1, 40):  # row kernels, panels
        got = np.asarray(cpu.quant_matvec(x[:rows], jnp.asarray(w), jnp.asarray(scale)))
        np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape))
    if codes == "fp8":  # signed zero stays a zero; 448 and the smallest subnormal are exact
        at = {int(c): k for k, c in enumerate(values)}
        assert got[0, at[0x80]] == 0 and got[0, at[0x7E]] == 448 * 0.25 * 2.0 ** (0x7E % 64 % 8 - 4)
        assert got[0, at[0x01]] == 2.0**-9 * 0.25 * 2.0 ** (1 % 8 - 4)


def _grouped_reference(x, w, sizes) -> np.ndarray:
    x = np.asarray(x, np.float64)
    group = np.repeat(np.arange(len(sizes)), sizes)
    out = np.zeros((x.shape[0], w.shape[-2]))
    for a, g in enumerate(group):
        out[a] = x[a] @ w[g].T
    return out


@needs_codes
@pytest.mark.parametrize("layout", ["channel", "rows"])
@pytest.mark.parametrize("sizes", [(1, 0, 1, 0), (3, 0, 9, 2), (40, 0, 33, 2), (2, 0, 0, 1)])
def test_quant_grouped_matvec_matches_float64(layout, sizes):
    rng = np.random.default_rng(sum(sizes))
    q, scale, w = _weights(rng, (2, 4, 70, 200), layout)  # [L, E, O, I]
    rows = max(sum(sizes), 4)
    x = _x(rng, rows, 200)
    sizes = jnp.asarray(sizes, jnp.int32)
    got = jax.jit(lambda x, q, s, n, layer: cpu.quant_grouped_matvec(x, q, s, n, (layer,)))(
        x, q, scale, sizes, jnp.int32(1)
    )
    assert rel_err(got, _grouped_reference(x, w[1], np.asarray(sizes))) <= RTOL
    assert not np.any(np.asarray(got)[int(sizes.sum()) :])


@needs_codes
def test_quant_products_reject_mismatches():
    q = jnp.zeros((6, 200), jnp.float8_e4m3fn)
    x = jnp.ones((2, 200), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"expected float32 \[..., 6, 1 or 2\]"):
        cpu.quant_matvec(x, q, jnp.ones((6, 3), jnp.float32))
    with pytest.raises(ValueError, match="no kernel for x float32"):
        cpu.quant_matvec(x.astype(jnp.float32), q, jnp.ones((6, 1), jnp.float32))
    with pytest.raises(ValueError, match="no kernel for x bfloat16 and w bfloat16"):
        cpu.quant_matvec(x, q.astype(jnp.bfloat16), jnp.ones((6, 1), jnp.float32))
    with pytest.raises(ValueError, match="sizes"):
        cpu.quant_grouped_matvec(x, q[None], jnp.ones((1, 6, 1)), jnp.ones((2,), jnp.int32))


# The loader's native helpers.


@needs_library
@pytest.mark.parametrize("layout", ["tensor", "row", "tiles"])
def test_dequantize_fp8_equals_the_numpy_path_bit_for_bit(layout):
    rng = np.random.default_rng(3)
    shape = (300, 260)
    codes = rng.integers(0, 256, shape, dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x01  # no NaN here (counted below)
    codes[0, :6] = [0x00, 0x80, 0x7E, 0xFE, 0x01, 0x81]  # zeros, +-448, subnormals
    codes = codes.view(E4M3)
    scale = {
        "tensor": np.float32(0.37),
        "row": rng.uniform(0.1, 3, shape[0]).astype(np.float32),
        "tiles": rng.uniform(0.1, 3, (3, 3)).astype(np.float32),
    }[layout]
    rows, cols = slice(3, 290), slice(2, 260)  # a TP slice's rectangle, off the tile edges
    want = fp8.codes_to_float32(codes[rows, cols])
    fp8.scale_on_host(want, scale, layout == "tiles", rows, cols, shape[1])
    blocks = (FP8_BLOCK, FP8_BLOCK) if layout == "tiles" else None
    for dtype in (np.float32, ml_dtypes.bfloat16):
        out = np.zeros((290, 300), dtype)[3:, 40:298]  # strided rows, as a shard's buffer
        bad = host.dequantize_fp8(codes[rows, cols], scale, out, row0=3, col0=2, blocks=blocks)
        expected = want if dtype == np.float32 else np.empty(want.shape, dtype)
        if dtype != np.float32:
            _to_bfloat16(want, expected)
        assert bad == 0
        np.testing.assert_array_equal(
            out.view(f"u{out.itemsize}"), expected.view(out.view(f"u{out.itemsize}").dtype)
        )


@needs_library
def test_dequantize_fp8_counts_nan_codes_and_overflow():
    codes = np.array([[0x7F, 0x01, 0xFF], [0x7E, 0x02, 0x00]], np.uint8).view(E4M3)
    out = np.empty((2, 3), np.float32)
    assert host.dequantize_fp8(codes, np.float32(1.0), out) == 2  # the two NaN codes
    assert host.dequantize_fp8(codes[1:], np.float32(1e37), out[1:]) == 1  # 448e37 -> inf


@needs_library
@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32, E4M3, np.float64])
def test_copy_checked_copies_and_counts_what_all_finite_refuses(dtype):
    rng = np.random.default_rng(4)
    src = np.zeros((40, 150), dtype)[2:, 5:]  # strided rows, tails past every vector width
    src[...] = rng.standard_normal(src.shape).astype(dtype)
    bits = src.view(f"u{src.itemsize}")
    sign = 1 << (8 * src.itemsize - 1)
    bits[3, 7] = NON_FINITE_FROM[np.dtype(dtype)] | sign  # a negative Inf (e4m3: NaN)
    bits[-1, -1] = NON_FINITE_FROM[np.dtype(dtype)]
    out = np.zeros((40, 160), dtype)
    dst = out[1:-1, 3:148]
    assert host.copy_checked(src, dst, NON_FINITE_FROM[np.dtype(dtype)]) == 2
    np.testing.assert_array_equal(dst.view(bits.dtype), bits)
    assert not all_finite(dst)
    assert not np.any(out[0].view(bits.dtype)) and not np.any(out[:, :3].view(bits.dtype))
    bits[3, 7] = bits[-1, -1] = 0
    assert host.copy_checked(src, dst, NON_FINITE_FROM[np.dtype(dtype)]) == 0
