"""The native attention kernel (``grok.kernels.cpu.attention``) against an independent float64
numpy attention written from the spec, and its place in the CPU kernels' ``attend``.

Shapes cover: a decode step (T 1) against a longer cache, a prompt at an offset in its cache,
several query chunks per (batch row, kv head), G above the kernel's 12-row tiles (16), head
dims 16 to 128, no logit cap, a temperature above 1 (positions past ``attn_temperature_len``),
and a row of length 0 (its queries see no key: the mean of all values, as the XLA path's
softmax over all-masked logits gives).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NATIVE_DTYPES as DTYPES
from conftest import attention_config, needs_f32

from grok.attention import attention_temperature
from grok.kernels import cpu
from grok.kernels.cpu.ops import CpuKernels
from grok.kernels.xla import XlaKernels

# (B, T, S, K, G, H, cap, temperature_len, a row of length 0)
CASES = [
    (2, 5, 9, 2, 3, 16, 30.0, 4, True),
    (3, 1, 40, 2, 4, 32, 30.0, 8, False),  # decode
    (1, 130, 140, 2, 4, 64, 50.0, 100, False),  # chunks; tau > 1 past 100
    (2, 37, 50, 1, 16, 128, None, None, True),  # G 16 > 12 rows; no cap, no temperature
]


def _reference(q, k, v, positions, lengths, cap, temperature_len, scale, prob_dtype):
    """float64 attention from the spec: logits q.k * scale, capped cap * tanh(s / cap), times
    tau(p) = log2(p) / log2(len) for p > len; causal and length mask; softmax; probabilities
    rounded to ``prob_dtype``; times v."""
    q, k, v = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (q, k, v))
    b, t, kh, g, h = q.shape
    s_len = k.shape[1]
    s = np.einsum("btkgh,bskh->bkgts", q, k) * scale
    if cap is not None:
        s = cap * np.tanh(s / cap)
    p = np.asarray(positions, np.float64)
    tau = np.ones_like(p)
    if temperature_len is not None:
        tau = np.where(p > temperature_len, np.log2(np.maximum(p, 1)) / np.log2(temperature_len), 1)
    s = s * tau[:, None, None, :, None]
    j = np.arange(s_len)
    visible = (j[None, None, :] <= np.asarray(positions)[:, :, None]) & (
        j[None, None, :] < np.asarray(lengths)[:, None, None]
    )  # [B, T, S]
    s = np.where(visible[:, None, None], s, -np.inf)
    blind = ~visible.any(-1)  # [B, T]: such a row averages all values
    s = np.where(blind[:, None, None, :, None], 0.0, s)
    e = np.exp(s - s.max(-1, keepdims=True))
    probs = e / e.sum(-1, keepdims=True)
    probs = np.asarray(probs.astype(np.float32).astype(prob_dtype), np.float64)
    return np.einsum("bkgts,bskh->btkgh", probs, v)


def _inputs(case, dtype, seed):
    b, t, s, kh, g, h, cap, temperature_len, blind = case
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, kh, g, h)) * 2, dtype)
    k = jnp.asarray(rng.standard_normal((b, s, kh, h)) * 2, dtype)
    v = jnp.asarray(rng.standard_normal((b, s, kh, h)), dtype)
    start = rng.integers(0, s - t + 1, b)
    positions = jnp.asarray(start[:, None] + np.arange(t)[None], jnp.int32)
    lengths = np.asarray(start + t, np.int32)
    if blind:
        lengths[0] = 0
    config = attention_config(kh, g, h, cap, temperature_len)
    return q, k, v, positions, jnp.asarray(lengths), config


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}S{}K{}G{}H{}".format(*c[:6]))
def test_attention_matches_float64(dtype, case):
    for seed in range(3):
        q, k, v, positions, lengths, config = _inputs(case, dtype, seed)
        tau = attention_temperature(positions, config.attn_temperature_len)
        got = cpu.attention(
            q,
            k,
            v,
            tau,
            positions,
            lengths,
            scale=config.attn_scale,
            cap=config.attn_logit_softcapping,
        )
        assert got.dtype == dtype and got.shape == q.shape
        want = _reference(
            q,
            k,
            v,
            positions,
            lengths,
            config.attn_logit_softcapping,
            config.attn_temperature_len,
            config.attn_scale,
            dtype,
        )
        err = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
        # float32: the kernel's exp and tanh (relative error ~2e-7); bfloat16: the output's
        # rounding (2^-8) and a probability rounding the other way now and then.
        assert err <= (2e-5 if dtype == jnp.float32 else 1.2e-2), (seed, err)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attend_uses_kernel_forward_and_xla_gradient(dtype):
    """``CpuKernels.attend``: the kernel's output, and the XLA path's gradient (the custom VJP
    differentiates XLA's attention: equal up to XLA's own fusion choices), the temperature's
    included."""
    q, k, v, positions, lengths, config = _inputs(CASES[0], dtype, 0)
    tau = attention_temperature(positions, config.attn_temperature_len) * 1.5  # tau != 1
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    kw = {"scale": config.attn_scale, "cap": config.attn_logit_softcapping}

    def loss(kernels, q, k, v, tau):
        out = kernels.attend(q, k, v, tau, positions, lengths, **kw)
        return jnp.sum(out.astype(jnp.float32) * weights)

    def value_and_grads(kernels):
        fn = jax.value_and_grad(functools.partial(loss, kernels), argnums=(0, 1, 2, 3))
        return jax.jit(fn)(q, k, v, tau)

    text = jax.jit(functools.partial(loss, CpuKernels())).lower(q, k, v, tau).as_text()
    assert cpu.ATTENTION_TARGET in text
    value_on, grads_on = value_and_grads(CpuKernels())
    value_xla, grads_xla = value_and_grads(XlaKernels("cpu"))
    np.testing.assert_allclose(value_on, value_xla, rtol=1e-2 if dtype == jnp.bfloat16 else 1e-5)
    for a, b in zip(grads_on, grads_xla, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


@needs_f32
def test_attention_rejects_bad_shapes():
    q, k, v, positions, lengths, config = _inputs(CASES[0], jnp.float32, 0)
    tau = jnp.ones(positions.shape, jnp.float32)
    kw = {"scale": 1.0, "cap": None}
    with pytest.raises(ValueError, match="attention"):
        cpu.attention(q, k[:, :, :1], v, tau, positions, lengths, **kw)  # K differs
    with pytest.raises(ValueError, match="head dim"):
        odd = q[..., :15]
        cpu.attention(odd, k[..., :15], v[..., :15], tau, positions, lengths, **kw)
    with pytest.raises(ValueError, match="attention"):
        cpu.attention(q, k, v.astype(jnp.bfloat16), tau, positions, lengths, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_reads_a_stacked_cache_in_place(dtype):
    """k, v inside [L, B, S, K, H] at a traced index equal the layer sliced out; bfloat16 as
    uint16 bits gives the same bits; an index past the end is clamped (lax.dynamic_slice)."""
    q, k, v, positions, lengths, config = _inputs(CASES[1], dtype, 0)
    rng = np.random.default_rng(5)
    ks = jnp.asarray(rng.standard_normal((3, *k.shape)), dtype).at[1].set(k)
    vs = jnp.asarray(rng.standard_normal((3, *v.shape)), dtype).at[1].set(v)
    tau = attention_temperature(positions, config.attn_temperature_len)
    kw = {"scale": config.attn_scale, "cap": config.attn_logit_softcapping}

    @jax.jit
    def in_place(q, ks, vs, layer):
        return cpu.attention(q, ks, vs, tau, positions, lengths, index=(layer,), **kw)

    want = cpu.attention(q, k, v, tau, positions, lengths, **kw)
    np.testing.assert_array_equal(in_place(q, ks, vs, jnp.int32(1)), want)
    last = cpu.attention(q, ks[2], vs[2], tau, positions, lengths, **kw)
    np.testing.assert_array_equal(in_place(q, ks, vs, jnp.int32(7)), last)
    if dtype == jnp.bfloat16:
        bits = jax.lax.bitcast_convert_type
        got = in_place(bits(q, jnp.uint16), bits(ks, jnp.uint16), bits(vs, jnp.uint16), 1)
        assert got.dtype == jnp.uint16
        np.testing.assert_array_equal(got, bits(want, jnp.uint16))
