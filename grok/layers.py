"""Small shared pieces: the soft cap, RMSNorm, GELU variants, and how a matrix parameter is
stored (plain, or quantised: codes and float32 scales, ``grok.quant``).

Pure functions live here so that they test without ``hk.transform``; the Haiku module
``RMSNorm`` only owns its weight.
"""

from __future__ import annotations

import dataclasses

import haiku as hk
import jax
import jax.numpy as jnp

from grok.quant import QUANT_DTYPES, dequantize, scale_shape


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantWeight:
    """A weight kept quantised on the device: ``W = q * scale``.

    ``q`` is float8_e4m3fn or int8; ``scale`` is float32 shaped by ``grok.quant.scale_shape``
    of the mode: the weight's shape with the ``in`` axes 1 (one scale per output channel), or
    in "fp8-block" with the ``in`` axes replaced by one axis of blocks of 128 inputs. Indexing
    the leading axes (layer, expert) indexes both, so an expert can be picked before it is
    dequantised.
    """

    q: jax.Array
    scale: jax.Array

    def __getitem__(self, index) -> QuantWeight:
        return QuantWeight(self.q[index], self.scale[index])

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def row_blocks(self) -> bool:
        """Whether the scale holds several blocks of inputs per output row ("fp8-block" over
        more than 128 inputs: the last axis G > 1) rather than one scale per row (the in axes
        1), which a product can apply to its sums."""
        return self.scale.shape[-1] != 1


def dequant(w, dtype: jnp.dtype):
    """A weight in ``dtype``: a ``QuantWeight`` as ``q * scale``; any other weight (an array,
    or a kernel implementation's view of one) as is when it has ``dtype``, else cast.

    Where a ``QuantWeight``'s codes are a kernel implementation's view rather than an array
    (``grok.kernels.base``), the view makes the weight: ``w.q.dequantized(w.scale, dtype)``,
    which that implementation's products may read as codes and scales in place (the native
    CPU kernels do) instead of a dequantised copy.
    """
    if isinstance(w, QuantWeight):
        lazy = getattr(w.q, "dequantized", None)
        if lazy is not None:
            return lazy(w.scale, dtype)
        return dequantize(w.q, w.scale, dtype)
    return w if w.dtype == jnp.dtype(dtype) else w.astype(dtype)


def for_product(w, dtype: jnp.dtype):
    """A weight as the kernels' products take it (``Kernels.project``): a ``QuantWeight`` as
    stored (the product applies its scale to the sums), anything else in ``dtype``."""
    return w if isinstance(w, QuantWeight) else dequant(w, dtype)


def get_weight(
    name: str,
    shape: tuple[int, ...],
    dtype: jnp.dtype,
    init: hk.initializers.Initializer,
    *,
    quant: str | None,
    in_dims: tuple[int, ...],
) -> jax.Array | QuantWeight:
    """A matrix parameter, plain or quantised (``quant``: a mode of ``grok.quant.QUANT_MODES``).

    A quantised weight is two parameters: ``name`` (float8/int8, ``shape``) and
    ``name + "_scale"`` (float32, ``scale_shape(shape, in_dims, quant)``). ``in_dims`` are
    the contracted (input) dims of ``shape``, its trailing ones, as seen inside the module (no
    layer axis).
    """
    if quant is None:
        return hk.get_parameter(name, shape, dtype, init=init)
    q = hk.get_parameter(name, shape, QUANT_DTYPES[quant], init=jnp.zeros)
    s_shape = scale_shape(shape, in_dims, quant)
    s = hk.get_parameter(name + "_scale", s_shape, jnp.float32, init=jnp.ones)
    return QuantWeight(q, s)
