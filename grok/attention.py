"""Grouped-query attention with soft-capped logits and a per-position temperature.

Glossary: B batch, T query positions, S key positions, D model width, N query heads,
K kv heads, G = N / K query heads per kv head, H head dim; O (N*H or K*H) and I (N*H) the
flattened heads of a projection's output and input.

Query head n reads kv head n // G (contiguous groups): q is viewed as [B, T, K, G, H] and
the attention never repeats K/V to N heads. The attention itself and the cache write are
operations of the kernels (``grok.kernels``); ``grok.kernels.xla.attention`` is the XLA form.
"""

from __future__ import annotations

import math

import haiku as hk
import jax
import jax.numpy as jnp

from grok.config import GrokConfig
from grok.kernels import Kernels
from grok.kv_cache import LayerCache
from grok.layers import QuantWeight, for_product, get_weight
from grok.rope import apply_rope


def attention_temperature(positions: jax.Array, temperature_len: int | None) -> jax.Array:
    """tau(p) = log2(p) / log2(len) where p > len, else 1. positions [B, T] -> f32 [B, T]."""
    p = positions.astype(jnp.float32)
    if temperature_len is None:
        return jnp.ones_like(p)
    tau = jnp.log2(jnp.maximum(p, 1.0)) / math.log2(temperature_len)
    return jnp.where(p > temperature_len, tau, 1.0)


def _matrix(w: jax.Array | QuantWeight, in_ndim: int) -> jax.Array | QuantWeight:
    """An [out..., in...] weight as the 2-D matrix [out, in] (its last ``in_ndim`` axes
    flattened into ``in``): q/k/v_proj [N, H, D] -> [N*H, D], o_proj [D, N, H] -> [D, N*H].

    XLA's dot canonicalisation wants the weight as [contracted, kept]; for a 2-D [out, in]
    matrix the CPU backend reads it transposed in place, but a 3-D weight was first copied to
    [D, N, H] (or [N, H, D] for o_proj). Inside the decode loop that is a copy of every
    layer's attention weights per token: scripts/benchmark.py on bench-grok1 (2 cores) ran
    decode at batch 1 at 85 tok/s in float32 and 142 in bfloat16 with the copies, 165 and
    208 without them.
    """
    if isinstance(w, QuantWeight):  # its scale: [out, 1] per channel, [out, G] in row blocks
        scale_in = w.scale.ndim - (w.q.ndim - in_ndim)  # row blocks: one axis of blocks
        return QuantWeight(_matrix(w.q, in_ndim), _matrix(w.scale, scale_in))
    n_out = w.ndim - in_ndim
    return w.reshape(math.prod(w.shape[:n_out]), math.prod(w.shape[n_out:]))


class Attention(hk.Module):
    """GQA self-attention. Parameters (no biases):

    q_proj [N, H, D], k_proj [K, H, D], v_proj [K, H, D], o_proj [D, N, H] (the release's
    [out, in] orientation, reshaped; see ``grok.params``).
    """

    def __init__(
        self,
        config: GrokConfig,
        dtype: jnp.dtype,
        quant: str | None = None,
        *,
        kernels: Kernels,
        name: str | None = None,
    ):
        super().__init__(name=name)
        self.config = config
        self.dtype = dtype
        self.quant = quant
        self.kernels = kernels

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        rope_cos: jax.Array,
        rope_sin: jax.Array,
        layer_cache: LayerCache | None,
        kv_lengths: jax.Array,
    ) -> tuple[jax.Array, LayerCache | None]:
        """Attention over the sequence (and the cache, when given).

        Args:
          x: [B, T, D] normalised input.
          positions: [B, T] absolute positions, contiguous per row.
          rope_cos, rope_sin: [B, T, H/2] rotary factors of those positions.
          layer_cache: this layer's place in the whole cache, or None for a plain forward.
          kv_lengths: [B] valid keys per sequence after this step's tokens are written.
        Returns:
          ([B, T, D] output, the cache with this step's keys and values written, or None).
        """
        cfg, kernels = self.config, self.kernels
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
        wq, wk, wv, wo = (for_product(w, dt) for w in (wq, wk, wv, wo))

        x = x.astype(self.dtype)
        b, t = x.shape[:2]
        # Each weight is multiplied as a 2-D [out, in] matrix (a free reshape of its
        # row-major bytes): contracting D of a 3-D [N, H, D] weight, XLA:CPU first copied it
        # transposed to [D, N, H], every layer at every decode step (see ``_matrix``).
        q = kernels.project("BTD,OD->BTO", x, _matrix(wq, 1)).reshape(b, t, n, h)  # [B,T,N,H]
        k = kernels.project("BTD,OD->BTO", x, _matrix(wk, 1)).reshape(b, t, kh, h)  # [B,T,K,H]
        v = kernels.project("BTD,OD->BTO", x, _matrix(wv, 1)).reshape(b, t, kh, h)  # [B,T,K,H]
        q = apply_rope(q, rope_cos, rope_sin)
        k = apply_rope(k, rope_cos, rope_sin)

        q = q.reshape(b, t, kh, cfg.q_per_kv, h)  # [B, T, K, G, H]
        tau = attention_temperature(positions, cfg.attn_temperature_len)  # [B, T]
        logits = dict(scale=cfg.attn_scale, cap=cfg.attn_logit_softcapping)
        if layer_cache is not None and layer_cache.pages is not None:  # a paged cache
            layer_cache = kernels.paged_write(layer_cache, k, v, positions[:, 0])
            out = kernels.paged_attend(q, layer_cache, tau, positions, kv_lengths, **logits)
        else:
            if layer_cache is None:
                keys, values = k, v  # [B, S=T, K, H]
            else:  # [B, S, K, H] each, this step's written at positions[:, 0] onwards
                layer_cache, keys, values = kernels.cache_write(layer_cache, k, v, positions[:, 0])
            out = kernels.attend(q, keys, values, tau, positions, kv_lengths, **logits)
        out = out.reshape(b, t, n * h)  # [B, T, N*H]
        return kernels.project("BTI,DI->BTD", out, _matrix(wo, 2)), layer_cache  # [B, T, D]
