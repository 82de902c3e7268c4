"""Grouped-query attention with soft-capped logits and a per-position temperature.

Glossary: B batch, T query positions, S key positions, D model width, N query heads,
K kv heads, G = N / K query heads per kv head, H head dim.

Query head n reads kv head n // G (contiguous groups): q is viewed as [B, T, K, G, H] and
the einsums never repeat K/V to N heads.
"""

from __future__ import annotations

import math

import haiku as hk
import jax
import jax.numpy as jnp

from grok.config import GrokConfig
from grok.kv_cache import write_layer
from grok.layers import dequant, get_weight, soft_cap
from grok.rope import apply_rope

NEG_INF = -1e30  # large negative for masked logits (finite: avoids NaN on empty rows)


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
    s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    s = soft_cap(s * config.attn_scale, config.attn_logit_softcapping)
    tau = attention_temperature(q_positions, config.attn_temperature_len)  # [B, T]
    s = s * tau[:, None, None, :, None]
    key_pos = jnp.arange(k.shape[1])[None, None, :]  # [1, 1, S]
    visible = (key_pos <= q_positions[:, :, None]) & (key_pos < kv_lengths[:, None, None])
    s = jnp.where(visible[:, None, None, :, :], s, NEG_INF)  # [B, K, G, T, S]
    return jax.nn.softmax(s, axis=-1)


class Attention(hk.Module):
    """GQA self-attention. Parameters (no biases):

    q_proj [D, N, H], k_proj [D, K, H], v_proj [D, K, H], o_proj [N, H, D].
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
        layer_cache: tuple[jax.Array, jax.Array] | None,
        kv_lengths: jax.Array,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Attention over the sequence (and the cache, when given).

        Args:
          x: [B, T, D] normalised input.
          positions: [B, T] absolute positions, contiguous per row.
          rope_cos, rope_sin: [B, T, H/2] rotary factors of those positions.
          layer_cache: this layer's (k, v), each [B, S, K, H], or None for a plain forward.
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
        init = hk.initializers.VarianceScaling(1.0, "fan_in", "truncated_normal")
        dt, quant = self.dtype, self.quant
        wq = get_weight("q_proj", (d, n, h), dt, init, quant=quant, in_dims=(0,))  # [D, N, H]
        wk = get_weight("k_proj", (d, kh, h), dt, init, quant=quant, in_dims=(0,))  # [D, K, H]
        wv = get_weight("v_proj", (d, kh, h), dt, init, quant=quant, in_dims=(0,))  # [D, K, H]
        wo = get_weight("o_proj", (n, h, d), dt, init, quant=quant, in_dims=(0, 1))  # [N, H, D]
        wq, wk, wv, wo = (dequant(w, dt) for w in (wq, wk, wv, wo))

        x = x.astype(self.dtype)
        q = jnp.einsum("BTD,DNH->BTNH", x, wq)  # [B, T, N, H]
        k = jnp.einsum("BTD,DKH->BTKH", x, wk)  # [B, T, K, H]
        v = jnp.einsum("BTD,DKH->BTKH", x, wv)  # [B, T, K, H]
        q = apply_rope(q, rope_cos, rope_sin)
        k = apply_rope(k, rope_cos, rope_sin)

        if layer_cache is None:
            keys, values, new_cache = k, v, None  # [B, S=T, K, H]
        else:
            cache_k, cache_v = layer_cache  # [B, S, K, H]
            start = positions[:, 0]  # [B]
            keys = write_layer(cache_k, k, start)
            values = write_layer(cache_v, v, start)
            new_cache = (keys, values)

        b, t = x.shape[:2]
        q = q.reshape(b, t, kh, cfg.q_per_kv, h)  # [B, T, K, G, H]
        probs = attention_weights(q, keys, positions, kv_lengths, cfg)  # [B, K, G, T, S]
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(values.dtype), values)
        out = out.reshape(b, t, n, h)  # [B, T, N, H]
        return jnp.einsum("BTNH,NHD->BTD", out, wo), new_cache  # [B, T, D]
