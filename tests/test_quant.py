"""grok.quant: FP8/int8 quantise and dequantise, per tensor, per channel and in blocks."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from grok.quant import (
    E4M3_MAX,
    INT8_MAX,
    dequantize,
    dequantize_blocks,
    quantize,
    quantize_blocks,
)


def test_per_channel_maps_each_row_max_to_the_format_max():
    w = np.random.default_rng(0).standard_normal((6, 40)).astype(np.float32)
    w[2] = 0  # an all-zero row gets scale 1
    for kind, qmax in (("fp8", E4M3_MAX), ("int8", INT8_MAX)):
        q, s = quantize(w, kind, in_dims=(1,))
        assert s.shape == (6, 1) and s[2, 0] == 1
        np.testing.assert_array_equal(np.max(np.abs(q.astype(np.float32)), axis=1)[[0, 1, 3]], qmax)
        back = dequantize(q, s)
        step = s * (2.0**-4 if kind == "fp8" else 0.5)  # half a step: rounding error bound
        assert np.all(np.abs(back - w) <= np.maximum(step * np.abs(w) / s, s) * 1.0001)


def test_per_tensor_and_int8_rounding():
    w = np.array([[0.5, -1.0, 0.26]], np.float32)
    q, s = quantize(w, "int8")
    assert s.shape == () and s == np.float32(1.0 / INT8_MAX)
    np.testing.assert_array_equal(q, np.array([[64, -127, 33]], np.int8))  # rint(0.5 * 127)


def test_numpy_and_jax_give_the_same_codes():
    w = np.random.default_rng(1).standard_normal((4, 8, 16)).astype(np.float32)
    qn, sn = quantize(w, "fp8", in_dims=(2,))
    qj, sj = quantize(jnp.asarray(w), "fp8", in_dims=(2,))
    assert qn.dtype == np.dtype(ml_dtypes.float8_e4m3fn) and qj.dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(np.asarray(sj), sn)  # true division on the device too
    np.testing.assert_array_equal(np.asarray(qj).astype(np.float32), qn.astype(np.float32))
    jitted = jax.jit(lambda x: quantize(x, "fp8", in_dims=(2,)))(jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(jitted[1]), sn)


@pytest.mark.parametrize("shape", [(128, 256), (130, 300), (5, 7)])
def test_blocks_round_trip_with_ragged_edges(shape):
    rng = np.random.default_rng(2)
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 100, (shape[0], 1))
    w[:, :3] = 0
    q, s = quantize_blocks(w)
    assert s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    back = dequantize_blocks(q, s)
    tile = np.repeat(np.repeat(s, 128, 0), 128, 1)[: shape[0], : shape[1]]
    assert np.all(np.abs(back - w) <= 2.0**-4 * np.abs(w) + tile * 2.0**-9)
    np.testing.assert_array_equal(back[:, :3], 0)
