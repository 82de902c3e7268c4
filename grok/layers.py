"""Small shared pieces: the soft cap, RMSNorm, GELU variants.

Pure functions live here so that they test without ``hk.transform``; the Haiku module
``RMSNorm`` only owns its weight.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)``; ``None`` means no cap. Used for attention, router and output."""
    if cap is None:
        return x
    return cap * jnp.tanh(x / cap)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis, in float32.

    The weight is used as is (not ``1 + w``). The result has the dtype of ``x``.
    """
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (x32 * inv * weight.astype(jnp.float32)).astype(x.dtype)


def activation(name: str):
    """The MLP activation: ``"gelu"`` is exact (erf) GELU, ``"gelu_tanh"`` the tanh form."""
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "gelu_tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unknown activation {name!r}")


class RMSNorm(hk.Module):
    """RMSNorm with a weight of shape [D] (initialised to ones)."""

    def __init__(self, eps: float, dtype: jnp.dtype, name: str | None = None):
        super().__init__(name=name)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        weight = hk.get_parameter("weight", (x.shape[-1],), self.dtype, init=jnp.ones)  # [D]
        return rms_norm(x, weight, self.eps)
