"""The grouped-matmul MoE path (``jax.lax.ragged_dot``, for GPU/TPU prefill) against the dense
every-expert oracle, quantised and not, with the expert width split over ``model`` on the
8-device CPU mesh; and the platform dispatch that picks it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from reference import random_tensors, reference_logits

import grok
from grok.api import Model
from grok.errors import ConfigError
from grok.kernels.xla import PREFILL_ENV, REFERENCE, prefill_impl
from grok.layers import QuantWeight
from grok.moe import EXPERT_IN_AXIS, moe_dense_reference, moe_ragged, route
from grok.presets import TINY_GROK2
from grok.sharding import make_mesh
from grok.testing import write_checkpoint

D, FE, E, K = 32, 64, 8, 2
ACT = jax.nn.gelu


def _layout(w: np.ndarray) -> np.ndarray:
    """[E, In, Out] -> the module's expert layout (``EXPERT_IN_AXIS``)."""
    return w if EXPERT_IN_AXIS == 1 else np.swapaxes(w, 1, 2)


def _experts(seed: int):
    """w1/w3 [E, D, Fe], w2 [E, Fe, D] float32, laid out as ``expert_weights`` does."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((E, D, FE)) / np.sqrt(D)
    w3 = rng.standard_normal((E, D, FE)) / np.sqrt(D)
    w2 = rng.standard_normal((E, FE, D)) / np.sqrt(FE)
    return tuple(jnp.asarray(_layout(w), jnp.float32) for w in (w1, w3, w2))


def _tokens(m: int, seed: int, skew: bool):
    """x [M, D] and its top-2 routing; ``skew`` sends every token to experts 0 and 1 or 5,
    leaving five experts empty (groups of size 0 in the grouped matmul)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, D)), jnp.float32)
    gate = jnp.asarray(rng.standard_normal((E, D)), jnp.float32)  # [E, D]: [out, in]
    weights, experts, _ = route(x, gate, cap=None, k=K)
    if skew:
        experts = jnp.stack([jnp.zeros(m, jnp.int32), jnp.where(experts[:, 0] % 2, 1, 5)], 1)
    return x, weights, experts


@pytest.mark.parametrize(("m", "skew"), [(1, False), (37, False), (64, True)])
def test_ragged_equals_dense_reference(m, skew):
    w1, w3, w2 = _experts(m)
    x, weights, experts = _tokens(m, m + 1, skew)
    fn = jax.jit(lambda *a: moe_ragged(*a, ACT))
    got = fn(x, weights, experts, w1, w3, w2)
    want = moe_dense_reference(x, weights, experts, w1, w3, w2, ACT)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    if skew:
        assert set(np.unique(np.asarray(experts))) == {0, 1, 5}


def test_ragged_with_fp8_weights_and_layer_views():
    """fp8 weights with per-output-channel scales, seen through stacked [L, E, ...] views:
    the same product as the oracle's dequantised weights."""
    w1, w3, w2 = _experts(5)
    x, weights, experts = _tokens(40, 6, False)

    def quantise(w, in_dim):  # per-output-channel e4m3 scale over the input dim
        scale = jnp.max(jnp.abs(w), axis=in_dim, keepdims=True) / 448.0
        q = (w / scale).astype(jnp.float8_e4m3fn)
        return QuantWeight(q[None].repeat(2, 0), scale[None].repeat(2, 0))  # [L=2, E, ...]

    views = [
        REFERENCE.layer_experts(quantise(w, EXPERT_IN_AXIS), jnp.int32(1)) for w in (w1, w3, w2)
    ]
    got = jax.jit(lambda x, ws, ex, views: moe_ragged(x, ws, ex, *views, ACT))(
        x, weights, experts, views
    )
    want = jax.jit(lambda x, ws, ex, views: moe_dense_reference(x, ws, ex, *views, ACT))(
        x, weights, experts, views
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (the CPU mesh of conftest)")
def test_ragged_with_expert_width_split_over_model():
    """Fe split 4 ways over ``model`` (as the loader places the experts): each device keeps
    its own Fe slice, the weights are never gathered, and the output is unchanged."""
    mesh = make_mesh(2, 4)
    w1, w3, w2 = _experts(7)
    x, weights, experts = _tokens(48, 8, False)
    fe_axis = {"w1": 3 - EXPERT_IN_AXIS, "w2": EXPERT_IN_AXIS}  # Fe: w1/w3's out, w2's in

    def split(w, axis):
        spec = [None, None, None]
        spec[axis] = "model"
        return jax.device_put(w, NamedSharding(mesh, P(*spec)))

    sharded = (split(w1, fe_axis["w1"]), split(w3, fe_axis["w1"]), split(w2, fe_axis["w2"]))
    assert sharded[0].addressable_shards[0].data.shape[fe_axis["w1"]] == FE // 4
    fn = jax.jit(lambda *a: moe_ragged(*a, ACT))
    compiled = fn.lower(x, weights, experts, *sharded).compile()
    hlo = compiled.as_text()
    assert "all-gather" not in hlo  # no device ever holds another's expert columns
    assert "all-reduce" in hlo  # the [A, D] partial sums over Fe slices
    got = compiled(x, weights, experts, *sharded)
    want = moe_dense_reference(x, weights, experts, w1, w3, w2, ACT)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_prefill_impl_by_platform_and_override(monkeypatch):
    monkeypatch.delenv(PREFILL_ENV, raising=False)
    assert prefill_impl("gpu") == prefill_impl("tpu") == "ragged"
    assert prefill_impl("cpu") == "blocks"
    assert prefill_impl("some-new-platform") == prefill_impl(None) == "blocks"
    monkeypatch.setenv(PREFILL_ENV, "ragged")
    assert prefill_impl("cpu") == "ragged"
    monkeypatch.setenv(PREFILL_ENV, "grouped")
    with pytest.raises(ConfigError, match=PREFILL_ENV):
        prefill_impl("gpu")


def test_model_logits_with_ragged_experts(tmp_path):
    """The whole model with ``moe_impl="ragged"`` (what GPU/TPU prefill runs) against the
    float64 reference, on a prompt long enough that the auto path would take blocks."""
    config = TINY_GROK2
    tensors = random_tensors(config, 4)
    loaded = grok.load_pretrained(
        write_checkpoint(tmp_path, config, tensors), dtype=jnp.float32, quiet=True
    )
    tokens = np.random.default_rng(4).integers(0, config.vocab_size, (2, 24))
    ragged = Model(config, loaded.params, dtype=jnp.float32, moe_impl="ragged")
    got = np.asarray(ragged.logits(tokens), np.float64)
    want = reference_logits(config, tensors, tokens)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-4
