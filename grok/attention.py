"""Grouped-query attention with soft-capped logits and a per-position temperature.

Glossary: B batch, T query positions, S key positions, D model width, N query heads,
K kv heads, G = N / K query heads per kv head, H head dim; O (N*H or K*H) and I (N*H) the
flattened heads of a projection's output and input.

Query head n reads kv head n // G (contiguous groups): q is viewed as [B, T, K, G, H] and
the einsums never repeat K/V to N heads.
"""

from __future__ import annotations

import functools
import math

import haiku as hk
import jax
import jax.numpy as jnp

from grok import native
from grok.config import GrokConfig
from grok.kv_cache import LayerView, write_layer
from grok.layers import (
    Stacked,
    as_bits,
    dense,
    dequant,
    from_bits,
    get_weight,
    native_enabled,
    project,
    soft_cap,
)
from grok.rope import apply_rope

NEG_INF = -1e30  # large negative for masked logits (finite: avoids NaN on empty rows)

# Prompts longer than QUERY_BLOCK queries take the blocked path: queries in blocks of
# QUERY_BLOCK, keys in blocks of KEY_BLOCK with an online softmax, so the live scores are
# [B, K, G, QUERY_BLOCK, KEY_BLOCK] and memory grows linearly with the prompt. 512 x 512
# float32 scores for 8 heads are 8 MiB: big enough for efficient matmuls, small for caches.
QUERY_BLOCK = 512
KEY_BLOCK = 512


def attention_temperature(positions: jax.Array, temperature_len: int | None) -> jax.Array:
    """tau(p) = log2(p) / log2(len) where p > len, else 1. positions [B, T] -> f32 [B, T]."""
    p = positions.astype(jnp.float32)
    if temperature_len is None:
        return jnp.ones_like(p)
    tau = jnp.log2(jnp.maximum(p, 1.0)) / math.log2(temperature_len)
    return jnp.where(p > temperature_len, tau, 1.0)


def attention_weights(
    q: jax.Array,
    k: jax.Array,
    q_positions: jax.Array,
    kv_lengths: jax.Array,
    config: GrokConfig,
) -> jax.Array:
    """Softmax attention probabilities.

    Args:
      q: [B, T, K, G, H] queries (RoPE applied).
      k: [B, S, K, H] keys (RoPE applied); key s sits at position s.
      q_positions: [B, T] absolute positions of the queries.
      kv_lengths: [B] number of valid keys per sequence.
    Returns:
      [B, K, G, T, S] float32 probabilities.
    """
    s, _ = _scores(q, k, q_positions, 0, kv_lengths, config)  # [B, K, G, T, S]
    return jax.nn.softmax(s, axis=-1)


def _scores(q, k, q_positions, key_start, kv_lengths, config):
    """Capped, tempered, masked logits of queries q [B, T, K, G, H] against keys k [B, S, K, H]
    that sit at positions key_start .. key_start + S - 1.

    Returns (scores [B, K, G, T, S] float32, visible [B, 1, 1, T, S] bool).
    """
    s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    s = soft_cap(s * config.attn_scale, config.attn_logit_softcapping)
    tau = attention_temperature(q_positions, config.attn_temperature_len)  # [B, T]
    s = s * tau[:, None, None, :, None]
    key_pos = key_start + jnp.arange(k.shape[1])[None, None, :]  # [1, 1, S]
    visible = (key_pos <= q_positions[:, :, None]) & (key_pos < kv_lengths[:, None, None])
    visible = visible[:, None, None, :, :]  # [B, 1, 1, T, S]
    return jnp.where(visible, s, NEG_INF), visible


def _pad_axis1(x: jax.Array, size: int, mode: str = "constant") -> jax.Array:
    """Pads axis 1 of x up to ``size`` (zeros, or repeating the edge with mode="edge")."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, size - x.shape[1])
    return jnp.pad(x, pad, mode=mode)


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    kv_lengths: jax.Array,
    config: GrokConfig,
    q_block: int = QUERY_BLOCK,
    k_block: int = KEY_BLOCK,
) -> jax.Array:
    """Attention output in query blocks x key blocks with an online (running-max) softmax.

    Equal to ``softmax(scores) @ v`` up to float rounding; memory is O(T + S) plus one
    [B, K, G, q_block, k_block] block of scores. Each query block visits only the key blocks
    below its last position and below max(kv_lengths), so causal prefill does about half the
    work of the full score matrix.

    Args:
      q: [B, T, K, G, H] queries (RoPE applied).
      k, v: [B, S, K, H] keys (RoPE applied) and values; key s sits at position s.
      q_positions: [B, T] absolute positions of the queries.
      kv_lengths: [B] number of valid keys per sequence.
    Returns:
      [B, T, K, G, H] in v's dtype.
    """
    b, t, kh, g, h = q.shape
    s_len = k.shape[1]
    nq = -(-t // q_block)
    nk = -(-s_len // k_block)
    q = _pad_axis1(q, nq * q_block)  # [B, Tp, K, G, H]
    q_positions = _pad_axis1(q_positions, nq * q_block, mode="edge")  # [B, Tp]
    k = _pad_axis1(k, nk * k_block)  # [B, Sp, K, H]; padded keys sit at >= S >= kv_lengths
    v = _pad_axis1(v, nk * k_block)
    kv_end = jnp.max(kv_lengths)

    def one_query_block(i):
        qb = jax.lax.dynamic_slice_in_dim(q, i * q_block, q_block, axis=1)  # [B, Tq, K, G, H]
        pb = jax.lax.dynamic_slice_in_dim(q_positions, i * q_block, q_block, axis=1)  # [B, Tq]
        # Key blocks past the block's last query position or past every length are all masked.
        last_key = jnp.minimum(jnp.max(pb) + 1, kv_end)
        n_visit = jnp.clip((last_key + k_block - 1) // k_block, 1, nk)

        def one_key_block(j, carry):
            m, l, acc = carry  # [B, K, G, Tq], [B, K, G, Tq], [B, K, G, Tq, H] float32
            kb = jax.lax.dynamic_slice_in_dim(k, j * k_block, k_block, axis=1)  # [B, Sk, K, H]
            vb = jax.lax.dynamic_slice_in_dim(v, j * k_block, k_block, axis=1)
            s, visible = _scores(qb, kb, pb, j * k_block, kv_lengths, config)  # [B,K,G,Tq,Sk]
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)  # [B, K, G, Tq, Sk]
            correction = jnp.exp(m - m_new)
            l = l * correction + jnp.sum(p, axis=-1)
            pv = jnp.einsum(
                "BKGTS,BSKH->BKGTH", p.astype(v.dtype), vb, preferred_element_type=jnp.float32
            )
            return m_new, l, acc * correction[..., None] + pv

        init = (
            jnp.full((b, kh, g, q_block), NEG_INF, jnp.float32),
            jnp.zeros((b, kh, g, q_block), jnp.float32),
            jnp.zeros((b, kh, g, q_block, h), jnp.float32),
        )
        _, l, acc = jax.lax.fori_loop(0, n_visit, one_key_block, init)
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [B, K, G, Tq, H]
        return jnp.einsum("BKGTH->BTKGH", out).astype(v.dtype)

    out = jax.lax.map(one_query_block, jnp.arange(nq))  # [nq, B, Tq, K, G, H]
    out = jnp.moveaxis(out, 0, 1).reshape(b, nq * q_block, kh, g, h)
    return out[:, :t]  # [B, T, K, G, H]


def xla_attend(
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    positions: jax.Array,
    kv_lengths: jax.Array,
    config: GrokConfig,
) -> jax.Array:
    """Attention output by XLA: the full score matrix, or ``blocked_attention`` past
    ``QUERY_BLOCK`` queries.

    Args:
      q: [B, T, K, G, H] queries (RoPE applied).
      keys, values: [B, S, K, H]; key s sits at position s.
      positions: [B, T] absolute positions of the queries.
      kv_lengths: [B] number of valid keys per sequence.
    Returns:
      [B, T, K, G, H] in ``values``' dtype.
    """
    if q.shape[1] > QUERY_BLOCK:  # static: long prompts in blocks, linear memory
        return blocked_attention(q, keys, values, positions, kv_lengths, config)
    probs = attention_weights(q, keys, positions, kv_lengths, config)  # [B, K, G, T, S]
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(values.dtype), values)


def _kernel(q, keys, values, positions, kv_lengths, config, index=()):
    """``native.attention`` with ``config``'s scale, cap and temperature."""
    return native.attention(
        q,
        keys,
        values,
        attention_temperature(positions, config.attn_temperature_len),  # [B, T]
        positions,
        kv_lengths,
        scale=config.attn_scale,
        cap=config.attn_logit_softcapping,
        index=index,
    )


# The native kernel computes the same attention with its scores in cache-sized tiles (bench-
# grok1, bf16, T 128: XLA spent about a fifth of the prefill on layout copies and elementwise
# passes over the [B, K, G, T, S] scores); its gradient is the XLA path's.
@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _native_attend(q, keys, values, positions, kv_lengths, config):
    return _kernel(q, keys, values, positions, kv_lengths, config)


def _native_attend_fwd(q, keys, values, positions, kv_lengths, config):
    out = _native_attend(q, keys, values, positions, kv_lengths, config)
    return out, (q, keys, values, positions, kv_lengths)


def _native_attend_bwd(config, res, g):
    q, keys, values, positions, kv_lengths = res
    _, vjp = jax.vjp(
        lambda q, k, v: xla_attend(q, k, v, positions, kv_lengths, config), q, keys, values
    )
    return (*vjp(g), None, None)


_native_attend.defvjp(_native_attend_fwd, _native_attend_bwd)


def _native_in_place(q, keys: Stacked, values: Stacked, positions, kv_lengths, config):
    """The kernel on a cache read where it lies (a layer of the whole cache: no copy of it);
    bfloat16 as uint16 bits where the cache holds them. Not differentiable (a cache step)."""
    bits = keys.array.dtype == jnp.uint16
    q = as_bits(q) if bits else q
    out = _kernel(q, keys.array, values.array, positions, kv_lengths, config, keys.index)
    return from_bits(out, keys.dtype)


def attend(
    q: jax.Array,
    keys: jax.Array | Stacked,
    values: jax.Array | Stacked,
    positions: jax.Array,
    kv_lengths: jax.Array,
    config: GrokConfig,
) -> jax.Array:
    """Attention output: the native kernel where the traced function may use it (one CPU
    device, ``grok.layers.native_kernels``) for its dtype, else ``xla_attend``. Same
    arguments and result as ``xla_attend``; ``keys`` and ``values`` may also be ``Stacked``
    views at one index (a layer of the whole KV cache, ``LayerView.views``), which the kernel
    reads in place and the XLA path slices out."""
    if (
        native_enabled()
        and q.dtype == keys.dtype == values.dtype
        and q.shape[-1] % 2 == 0
        and native.available(q.dtype)
    ):
        if isinstance(keys, Stacked):
            if any(a is not b for a, b in zip(keys.index, values.index, strict=True)):
                raise ValueError("attend: keys and values at different indices")
            return _native_in_place(q, keys, values, positions, kv_lengths, config)
        return _native_attend(q, keys, values, positions, kv_lengths, config)
    return xla_attend(q, dense(keys), dense(values), positions, kv_lengths, config)


def _matrix(w: jax.Array, in_ndim: int) -> jax.Array:
    """An [out..., in...] weight as the 2-D matrix [out, in] (its last ``in_ndim`` axes
    flattened into ``in``): q/k/v_proj [N, H, D] -> [N*H, D], o_proj [D, N, H] -> [D, N*H].

    XLA's dot canonicalisation wants the weight as [contracted, kept]; for a 2-D [out, in]
    matrix the CPU backend reads it transposed in place, but a 3-D weight was first copied to
    [D, N, H] (or [N, H, D] for o_proj). Inside the decode loop that is a copy of every
    layer's attention weights per token: scripts/benchmark.py on bench-grok1 (2 cores) ran
    decode at batch 1 at 85 tok/s in float32 and 142 in bfloat16 with the copies, 165 and
    208 without them.
    """
    n_out = w.ndim - in_ndim
    return w.reshape(math.prod(w.shape[:n_out]), math.prod(w.shape[n_out:]))


class Attention(hk.Module):
    """GQA self-attention. Parameters (no biases):

    q_proj [N, H, D], k_proj [K, H, D], v_proj [K, H, D], o_proj [D, N, H] (the release's
    [out, in] orientation, reshaped; see ``grok.params``).
    """

    def __init__(self, config: GrokConfig, dtype: jnp.dtype, quant: str | None = None, name=None):
        super().__init__(name=name)
        self.config = config
        self.dtype = dtype
        self.quant = quant

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        rope_cos: jax.Array,
        rope_sin: jax.Array,
        layer_cache: tuple[jax.Array, jax.Array] | LayerView | None,
        kv_lengths: jax.Array,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Attention over the sequence (and the cache, when given).

        Args:
          x: [B, T, D] normalised input.
          positions: [B, T] absolute positions, contiguous per row.
          rope_cos, rope_sin: [B, T, H/2] rotary factors of those positions.
          layer_cache: this layer's (k, v), each [B, S, K, H], or a ``LayerView`` of the whole
            cache, or None for a plain forward.
          kv_lengths: [B] valid keys per sequence after this step's tokens are written.
        Returns:
          ([B, T, D] output, updated (k, v) or None).
        """
        cfg = self.config
        d, n, kh, h = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        init = hk.initializers.VarianceScaling(1.0, "fan_out", "truncated_normal")  # [out, in]
        dt, quant = self.dtype, self.quant
        wq = get_weight("q_proj", (n, h, d), dt, init, quant=quant, in_dims=(2,))  # [N, H, D]
        wk = get_weight("k_proj", (kh, h, d), dt, init, quant=quant, in_dims=(2,))  # [K, H, D]
        wv = get_weight("v_proj", (kh, h, d), dt, init, quant=quant, in_dims=(2,))  # [K, H, D]
        wo = get_weight("o_proj", (d, n, h), dt, init, quant=quant, in_dims=(1, 2))  # [D, N, H]
        wq, wk, wv, wo = (dequant(w, dt) for w in (wq, wk, wv, wo))

        x = x.astype(self.dtype)
        b, t = x.shape[:2]
        # Each weight is multiplied as a 2-D [out, in] matrix (a free reshape of its
        # row-major bytes): contracting D of a 3-D [N, H, D] weight, XLA:CPU first copied it
        # transposed to [D, N, H], every layer at every decode step (see ``_matrix``).
        q = project("BTD,OD->BTO", x, _matrix(wq, 1)).reshape(b, t, n, h)  # [B, T, N, H]
        k = project("BTD,OD->BTO", x, _matrix(wk, 1)).reshape(b, t, kh, h)  # [B, T, K, H]
        v = project("BTD,OD->BTO", x, _matrix(wv, 1)).reshape(b, t, kh, h)  # [B, T, K, H]
        q = apply_rope(q, rope_cos, rope_sin)
        k = apply_rope(k, rope_cos, rope_sin)

        if layer_cache is None:
            keys, values, new_cache = k, v, None  # [B, S=T, K, H]
        elif isinstance(layer_cache, LayerView):
            new_cache = layer_cache.write(k, v, positions[:, 0])
            keys, values = new_cache.views()  # [B, S, K, H] each, not sliced out
        else:
            cache_k, cache_v = layer_cache  # [B, S, K, H]
            start = positions[:, 0]  # [B]
            # Written through uint16 views (layers.as_bits): a bf16 update made XLA:CPU
            # convert the layer's whole cache to float32 and back at every step.
            keys = from_bits(
                write_layer(as_bits(cache_k), as_bits(k.astype(cache_k.dtype)), start),
                cache_k.dtype,
            )
            values = from_bits(
                write_layer(as_bits(cache_v), as_bits(v.astype(cache_v.dtype)), start),
                cache_v.dtype,
            )
            new_cache = (keys, values)

        q = q.reshape(b, t, kh, cfg.q_per_kv, h)  # [B, T, K, G, H]
        out = attend(q, keys, values, positions, kv_lengths, cfg).reshape(b, t, n * h)
        return project("BTI,DI->BTD", out, _matrix(wo, 2)), new_cache  # [B, T, D]
