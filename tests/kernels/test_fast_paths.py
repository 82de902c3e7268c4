"""The fast paths equal the plain ones: blocked attention vs full softmax, the MoE decode and
prefill paths vs the dense every-expert oracle (skewed routing included)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params

from grok.attention import attention_temperature
from grok.kernels import xla
from grok.kv_cache import KVCache
from grok.model import forward_fns
from grok.moe import MAX_BLOCK, block_size_for, moe_blocks, moe_dense_reference, moe_gather, route
from grok.presets import TINY_GROK2
from grok.rope import rope_table

ACT = jax.nn.gelu


def _logit_args(cfg) -> dict:
    return {"scale": cfg.attn_scale, "cap": cfg.attn_logit_softcapping}


def _full_attention(q, k, v, tau, positions, lengths, cfg):
    probs = xla.attention_weights(q, k, tau, positions, lengths, **_logit_args(cfg))
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)  # probs [B, K, G, T, S]


@pytest.mark.parametrize("t, q_block, k_block", [(37, 8, 16), (5, 8, 4)])
def test_blocked_attention_equals_softmax(t, q_block, k_block):
    cfg = TINY_GROK2  # caps and a temperature length of 4, so tau varies inside a block
    rng = np.random.default_rng(t)
    b, kh, g, h, s = 2, 2, 2, 16, 48
    q = jnp.asarray(rng.normal(size=(b, t, kh, g, h)), jnp.float32)  # [B, T, K, G, H]
    k = jnp.asarray(rng.normal(size=(b, s, kh, h)), jnp.float32)  # [B, S, K, H]
    v = jnp.asarray(rng.normal(size=(b, s, kh, h)), jnp.float32)
    start = jnp.array([0, 7])  # the second row continues after 7 cached tokens
    positions = start[:, None] + jnp.arange(t)[None]  # [B, T]
    lengths = start + t
    tau = attention_temperature(positions, cfg.attn_temperature_len)  # [B, T]
    want = _full_attention(q, k, v, tau, positions, lengths, cfg)
    blocks = dict(q_block=q_block, k_block=k_block, **_logit_args(cfg))
    blocked = jax.jit(functools.partial(xla.blocked_attention, **blocks))
    got = blocked(q, k, v, tau, positions, lengths)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-5)


def _logits(cfg, params, blocked: bool, monkeypatch, steps):
    """Runs (tokens, start) chunks through a fresh trace; the cache when steps say so."""
    block = 8 if blocked else 4096
    monkeypatch.setattr(xla, "QUERY_BLOCK", block)
    monkeypatch.setattr(xla, "KEY_BLOCK", block)
    forward_fns.cache_clear()  # a new function object, so jit traces with these block sizes
    apply = jax.jit(forward_fns(cfg, jnp.dtype(jnp.float32)).apply)
    rope = rope_table(cfg)
    cache = KVCache.create(cfg, 2, 40, jnp.float32) if steps[0][2] else None
    outs = []
    for tokens, start, _ in steps:
        t = tokens.shape[1]
        positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), tokens.shape)
        lengths = jnp.full((2,), start + t, jnp.int32)
        out, cache = apply(params, tokens, positions, rope, cache, lengths)
        outs.append(np.asarray(out))
    forward_fns.cache_clear()
    return outs


@pytest.fixture(scope="module")
def tiny_params():
    return random_params(TINY_GROK2, seed=3)


@pytest.mark.parametrize("use_cache", [False, True])
def test_model_logits_blocked_equal_plain(monkeypatch, tiny_params, use_cache):
    cfg, params = TINY_GROK2, tiny_params
    rng = np.random.default_rng(0)
    long = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 20)), jnp.int32)  # T above the block
    short = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 6)), jnp.int32)  # T below it
    # With the cache: a long prompt (T above the block), then one decode step (T below it).
    # Without: below the block both runs take the same unblocked code, so only T above it.
    with_cache = [(long, 0, True), (short[:, :1], 20, True)]
    steps = with_cache if use_cache else [(long, 0, False)]
    plain = _logits(cfg, params, False, monkeypatch, steps)
    blocked = _logits(cfg, params, True, monkeypatch, steps)
    for p, q in zip(plain, blocked, strict=True):
        np.testing.assert_allclose(q, p, atol=2e-5, rtol=1e-5)


def _moe_inputs(m, e, seed, skew=False):
    rng = np.random.default_rng(seed)
    d, fe = 24, 40
    x = jnp.asarray(rng.normal(size=(m, d)), jnp.float32)  # [M, D]
    w1 = jnp.asarray(rng.normal(size=(e, fe, d)) * d**-0.5, jnp.float32)  # [E, Fe, D]
    w3 = jnp.asarray(rng.normal(size=(e, fe, d)) * d**-0.5, jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(e, d, fe)) * fe**-0.5, jnp.float32)  # [E, D, Fe]
    w_gate = rng.normal(size=(e, d))
    if skew:  # expert 3 wins every token by a wide margin; expert 5 is always second
        w_gate = w_gate * 0.01
        x = x.at[:, 0].set(jnp.abs(x[:, 0]) + 1.0)
        w_gate[3, 0], w_gate[5, 0] = 50.0, 25.0
    weights, experts, _ = route(x, jnp.asarray(w_gate, jnp.float32), cap=None, k=2)
    return x, weights, experts, w1, w3, w2


@pytest.mark.parametrize("m, skew", [(1, False), (3, False), (4, True), (8, False)])
def test_moe_gather_equals_dense(m, skew):
    args = _moe_inputs(m, 8, seed=m, skew=skew)
    if skew:
        assert set(np.asarray(args[2][:, 0]).tolist()) == {3}
    want = moe_dense_reference(*args, ACT)
    got = jax.jit(lambda *a: moe_gather(*a, ACT))(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "m, block, skew", [(64, None, False), (64, 8, True), (37, 16, False), (200, None, True)]
)
def test_moe_blocks_equals_dense(m, block, skew):
    args = _moe_inputs(m, 8, seed=m, skew=skew)
    if skew:  # one expert takes every token's first choice: one group of M, six empty ones
        assert np.bincount(np.asarray(args[2]).reshape(-1), minlength=8)[3] == m
    want = moe_dense_reference(*args, ACT)
    got = jax.jit(lambda *a: moe_blocks(*a, ACT, block=block))(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_block_size_for_bounds():
    assert block_size_for(2, 8) == 8  # never below 8 rows
    assert block_size_for(256, 8) == 32  # about one block per expert
    assert block_size_for(65536, 8) == MAX_BLOCK == 128  # capped
    assert all(b & (b - 1) == 0 for b in (block_size_for(a, 8) for a in range(1, 3000, 97)))
