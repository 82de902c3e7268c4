"""``grok.testing.random_params``, the one maker of random weights (the tests', the benchmarks',
the accelerator check's): the model's own tree, the asked scales, and the same values whether
a leaf is made with numpy on the host or by a compiled program on the device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok import testing
from grok.params import weight_specs
from grok.presets import TINY_GROK1, TINY_GROK2
from grok.testing import FAN_IN, WeightScales, param_shapes, random_params


def _leaves(tree):
    return {(m, n): v for m, t in tree.items() for n, v in t.items()}


@pytest.mark.parametrize("quant", [None, "fp8", "int8"])
def test_the_tree_is_the_models(quant):
    params = random_params(TINY_GROK2, dtype=jnp.bfloat16, quant=quant)
    shapes = _leaves(param_shapes(TINY_GROK2, jnp.bfloat16, quant))
    got = _leaves(params)
    assert got.keys() == shapes.keys()
    for key, value in got.items():
        assert isinstance(value, jax.Array), key
        assert (value.shape, value.dtype) == (shapes[key].shape, shapes[key].dtype), key
        assert np.isfinite(np.asarray(value, np.float32)).all(), key


def test_scales_norms_and_quantised_weights():
    c = TINY_GROK2
    plain = _leaves(random_params(c, 1, host=True))
    assert np.all(plain["grok/final_norm", "weight"] == 1)  # no jitter asked
    for (module, name), value in plain.items():
        if "norm" not in module:
            assert value.std() == pytest.approx(0.02, rel=0.1), (module, name)
            assert abs(value.mean()) < 0.005, (module, name)
    fan = _leaves(random_params(c, 1, scales=FAN_IN, host=True))
    for spec in weight_specs(c):
        value = fan[spec.module, spec.name]
        if "norm" in spec.module:
            assert value.std() == pytest.approx(0.1, rel=0.2), spec.module
            assert value.mean() == pytest.approx(1, abs=0.05), spec.module
        else:  # matrices, the embedding and the head: 1 / sqrt(fan-in)
            fan_in = np.prod([spec.shape[d] for d in spec.in_dims])
            assert value.std() == pytest.approx(fan_in**-0.5, rel=0.1), spec.name
    custom = _leaves(random_params(c, scales=WeightScales(embedding=1.0, router=0.5), host=True))
    assert custom["grok", "embed_tokens"].std() == pytest.approx(1.0, rel=0.1)
    assert custom["grok/layers/layer/moe", "router"].std() == pytest.approx(0.5, rel=0.1)
    # FP8: codes of std 16 times per-channel scales of 0.02 / 16 -> weights of std 0.02,
    # following the bf16 tree's values (the same hash), to the codes' rounding.
    fp8 = _leaves(random_params(c, 1, dtype=jnp.bfloat16, quant="fp8", host=True))
    q, scale = fp8["grok/experts", "w1"], fp8["grok/experts", "w1_scale"]
    assert q.dtype == jnp.float8_e4m3fn and scale.shape == (*q.shape[:-1], 1)
    w = q.astype(np.float32) * scale
    assert w.std() == pytest.approx(0.02, rel=0.1)
    np.testing.assert_allclose(w, plain["grok/experts", "w1"], atol=0.02 * 0.15)


def test_seeds_and_leaves_differ_the_same_seed_repeats():
    a = _leaves(random_params(TINY_GROK1, 3, host=True))
    b = _leaves(random_params(TINY_GROK1, 3, host=True))
    c = _leaves(random_params(TINY_GROK1, 4, host=True))
    key = ("grok/experts", "w1")
    np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a[key], c[key])
    assert not np.array_equal(a[key], a["grok/experts", "w3"])  # same shape, other values


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float8_e4m3fn, jnp.int8])
def test_host_and_device_make_the_same_values(monkeypatch, dtype):
    """A leaf above ``HOST_ELEMENTS`` is made on the device, in chunks of whole rows: the
    values are those numpy computes for the whole leaf."""
    s = jax.ShapeDtypeStruct((5, 33, 40), jnp.dtype(dtype))
    law = testing._law(TINY_GROK2, "m", "w", s.dtype, WeightScales())
    host = testing._host_leaf(s, law, key=1234)
    monkeypatch.setattr(testing, "CHUNK_ELEMENTS", 2 * 33 * 40)  # chunks of 2, 2, 1 rows
    device = testing._device_leaf(s, law, key=1234)
    np.testing.assert_array_equal(np.asarray(device).view(np.uint8), host.view(np.uint8))
    monkeypatch.setattr(testing, "HOST_ELEMENTS", 10)  # random_params takes the device path
    on_device = random_params(TINY_GROK2, dtype=jnp.bfloat16)
    on_host = random_params(TINY_GROK2, dtype=jnp.bfloat16, host=True)
    for key, value in _leaves(on_host).items():
        np.testing.assert_array_equal(np.asarray(_leaves(on_device)[key]), value, str(key))


def test_element_indices_past_two_to_the_32():
    """A chunk starting just below 2^32 carries into the high bits as numpy's 64-bit index
    does (a full-width layer's expert weights pass 2^32 elements from four layers on)."""
    start = (1 << 32) - 3
    law = testing._Law(0.0, 1.0)
    bits = jnp.asarray([start & 0xFFFFFFFF, start >> 32], jnp.uint32)
    got = testing._device_chunk(bits, jnp.uint32(99), shape=(6,), dtype=jnp.float32, law=law)
    index = np.arange(start, start + 6, dtype=np.uint64)
    low = (index & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    high = (index >> np.uint64(32)).astype(np.uint32)
    want = testing._uniform(low, high, np.uint32(99))
    np.testing.assert_array_equal(np.asarray(got), want)
    assert len(set(want.tolist())) == 6


def test_random_hf_tensors_are_the_released_names():
    tensors = testing.random_hf_tensors(TINY_GROK2, 0)
    names = {
        name: spec.hf_shape for spec in weight_specs(TINY_GROK2) for _, name in spec.hf_names()
    }
    assert {n: t.shape for n, t in tensors.items()} == names
    assert all(t.dtype == np.float32 for t in tensors.values())
