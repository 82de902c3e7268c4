"""Small shared pieces: the soft cap, RMSNorm, GELU variants.

Pure functions live here so that they test without ``hk.transform``; the Haiku module
``RMSNorm`` only owns its weight.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator

import haiku as hk
import jax
import jax.numpy as jnp

from grok import native
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


# XLA:CPU has no native kernel for a bfloat16 matrix-vector product: with one row of
# activations it converts the whole weight to float32 first (and hoists that conversion out of
# loops, so a decode step converted every layer's weights), which made bf16 decode no faster
# than float32. From two rows up the product runs natively (YNNPACK), reading half float32's
# bytes. Measured on the 2-core CPU: 64 MB of bf16 weights times one row in 212 ms, times two
# rows in 5.2 ms (float32, one row: 9.6 ms for the 128 MB). So on the CPU a single low-precision
# row is padded to two; the extra row costs arithmetic only, and a decode step is bound by
# bytes.
MIN_NATIVE_ROWS = 2


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Stacked:
    """One weight inside a stacked array, not sliced out yet: ``array[index]``.

    On XLA:CPU a slice of a stacked ``[L, ...]`` weight is a copy made before the matmul that
    reads it, so the layer loop hands the modules these views instead; ``project`` multiplies
    one in place (``grok.native.matvec``) where it can and slices it otherwise, and ``dense``
    slices it for every other use.

    ``array`` is [*lead, ...] (a bfloat16 or float16 weight may be its uint16 view,
    ``as_bits``), ``index`` one int32 scalar per leading axis taken so far, ``dtype`` the
    weight's own dtype.
    """

    array: jax.Array
    index: tuple[jax.Array, ...]
    dtype: jnp.dtype = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape[len(self.index) :]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index) -> Stacked:
        """Takes further leading axes: ``view[e]`` or ``view[l, e]`` (int32 scalars)."""
        index = index if isinstance(index, tuple) else (index,)
        return Stacked(self.array, self.index + tuple(index), self.dtype)

    def reshape(self, *shape: int) -> Stacked:
        """The same view with its own axes reshaped (the stacked axes untouched; no copy)."""
        lead = self.array.shape[: len(self.index)]
        return Stacked(self.array.reshape(*lead, *shape), self.index, self.dtype)

    def materialize(self) -> jax.Array:
        """The weight itself, sliced out (a copy on XLA:CPU)."""
        if not self.index:
            return from_bits(self.array, self.dtype)
        # Sliced as uint16 bits: a bf16 slice made XLA:CPU convert the whole array to float32.
        return from_bits(native.take(as_bits(self.array), self.index), self.dtype)


def stacked(array: jax.Array, dtype: jnp.dtype | None = None) -> Stacked:
    """A ``Stacked`` view of a whole array (``dtype``: its own dtype when ``array`` holds its
    uint16 bits)."""
    return Stacked(array, (), jnp.dtype(dtype or array.dtype))


def dense(w):
    """A weight as a plain array (or ``QuantWeight`` of plain arrays): ``Stacked`` views are
    sliced out, anything else is returned as is."""
    if isinstance(w, Stacked):
        return w.materialize()
    if isinstance(w, QuantWeight):
        return QuantWeight(dense(w.q), dense(w.scale))
    return w


# Whether the function being traced may call the native kernels (``project``, the MoE's
# grouped product, ``grok.attention.attend``): set around tracing by the model's apply
# (``grok.model.forward_fns``), off on a mesh (a custom call would need the whole weight on
# every device) and for training.
_NATIVE = contextvars.ContextVar("grok_native_kernels", default=False)


@contextlib.contextmanager
def native_kernels(enabled: bool) -> Iterator[None]:
    """Within this block (while a function is traced) the layers use ``grok.native`` where a
    kernel exists: ``project`` for decode-sized products (and bf16 views of any size), the
    MoE's grouped product and the attention."""
    token = _NATIVE.set(enabled)
    try:
        yield
    finally:
        _NATIVE.reset(token)


def native_enabled() -> bool:
    """Whether the function being traced may use ``grok.native`` (see ``native_kernels``)."""
    return _NATIVE.get()


def _kernel_operands(x: jax.Array, w) -> tuple[jax.Array, jax.Array, tuple]:
    """(x, the array the kernel reads, its leading indices) for a plain weight or a ``Stacked``
    view; ``x`` as uint16 bits where the weight is (the kernels read bfloat16 bits as such)."""
    array, index = (w.array, w.index) if isinstance(w, Stacked) else (w, ())
    if array.dtype == jnp.uint16:
        x = as_bits(x)
    return x, array, index


def native_grouped(x: jax.Array, w, sizes: jax.Array) -> jax.Array | None:
    """Rows ``x`` [A, I] sorted by group times their group's matrix of ``w`` [G, O, I] (an
    array or a ``Stacked`` view): [A, O] float32 by ``grok.native.grouped_matvec``, or None
    where it does not apply (off, quantised, another dtype)."""
    if (
        not _NATIVE.get()
        or isinstance(w, QuantWeight)
        or w.ndim != 3
        or jnp.dtype(x.dtype) != jnp.dtype(w.dtype)
        or not native.available(x.dtype)
    ):
        return None
    x, array, index = _kernel_operands(x, w)
    return native.grouped_matvec(x, array, sizes, index)


def _native_any_rows(w) -> bool:
    """Whether the kernel also takes prefill-sized products of ``w``: a bfloat16 ``Stacked``
    view, read in place, beat slicing it out for XLA's bf16 GEMM (bench-grok1 prefill at batch
    8: 135-140 against 145-148 ms); for float32 XLA's GEMM was 2-4% faster."""
    return isinstance(w, Stacked) and w.dtype == jnp.dtype(jnp.bfloat16)


def _native_product(equation: str, x: jax.Array, w) -> jax.Array | None:
    """``x [..., I] . w [O, I]`` (float32 [..., O]) by the native kernel, or None where it does
    not apply (off, too many rows, another equation or dtype)."""
    if not _NATIVE.get() or w.ndim != 2 or jnp.dtype(x.dtype) != jnp.dtype(w.dtype):
        return None
    inputs, out_letters = equation.split("->")
    x_letters, w_letters = inputs.split(",")
    rows = math.prod(x.shape[:-1])
    if (
        (rows > native.MAX_ROWS and not _native_any_rows(w))
        or len(w_letters) != 2
        or x_letters[-1] != w_letters[1]
        or out_letters != x_letters[:-1] + w_letters[0]
        or not native.available(x.dtype)
    ):
        return None
    x, array, index = _kernel_operands(x, w)
    y = native.matvec(x.reshape(rows, x.shape[-1]), array, index)  # [rows, O]
    return y.reshape(*x.shape[:-1], w.shape[0])


def project(
    equation: str, x: jax.Array, w: jax.Array | Stacked, out_dtype: jnp.dtype | None = None
) -> jax.Array:
    """``einsum(equation, x, w)`` accumulated in float32, returned in ``out_dtype`` (default:
    ``x``'s dtype).

    ``x`` is the activation (its first axis is a batch axis that the output keeps), ``w`` the
    weight, e.g. ``project("BTD,DNH->BTNH", x, wq)``, or a ``Stacked`` view of it.
    """
    y = _native_product(equation, x, w)
    if y is not None:
        return y.astype(out_dtype or x.dtype)
    w = dense(w)
    inputs, out_letters = equation.split("->")
    x_letters = inputs.split(",")[0]
    rows = math.prod(n for n, c in zip(x.shape, x_letters, strict=True) if c in out_letters)
    pad = (
        rows < MIN_NATIVE_ROWS
        and x.dtype != jnp.float32
        and x.shape[0] == rows
        and jax.default_backend() == "cpu"
    )
    if pad:
        x = jnp.concatenate([x, jnp.zeros((MIN_NATIVE_ROWS - rows, *x.shape[1:]), x.dtype)])
    y = jnp.einsum(equation, x, w, preferred_element_type=jnp.float32)
    if pad:
        y = jax.lax.slice_in_dim(y, 0, rows, axis=out_letters.index(x_letters[0]))
    return y.astype(out_dtype or x.dtype)


# XLA:CPU's float normalisation treats a bf16 (or f16) slice, update or gather as unsupported:
# it converts the whole array to float32 around it, and hoists that conversion out of loops.
# The same bits seen as uint16 stay 16-bit. ``as_bits``/``from_bits`` make those views (on
# the CPU; elsewhere they return the array as is); a bitcast moves no data.
_BIT_VIEWS = {jnp.dtype(jnp.bfloat16): jnp.uint16, jnp.dtype(jnp.float16): jnp.uint16}


def as_bits(x: jax.Array) -> jax.Array:
    """A 16-bit float array as its uint16 view on the CPU; anything else unchanged."""
    bits = _BIT_VIEWS.get(jnp.dtype(x.dtype))
    if bits is None or jax.default_backend() != "cpu":
        return x
    return jax.lax.bitcast_convert_type(x, bits)


def from_bits(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Undoes ``as_bits``: a uint16 view back to the 16-bit float ``dtype``."""
    if x.dtype == jnp.uint16 and jnp.dtype(dtype) in _BIT_VIEWS:
        return jax.lax.bitcast_convert_type(x, dtype)
    return x


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
        weight = dense(hk.get_parameter("weight", (x.shape[-1],), self.dtype, init=jnp.ones))
        return rms_norm(x, weight, self.eps)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantWeight:
    """A weight kept quantised on the device: ``W = q * scale``.

    ``q`` is float8_e4m3fn or int8; ``scale`` is float32 with the weight's shape except the
    ``in`` axes, which are 1 (one scale per output channel). Indexing the leading axes (layer,
    expert) indexes both, so an expert can be picked before it is dequantised.
    """

    q: jax.Array
    scale: jax.Array

    def __getitem__(self, index) -> QuantWeight:
        return QuantWeight(self.q[index], self.scale[index])

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape


def dequant(w: jax.Array | QuantWeight | Stacked, dtype: jnp.dtype) -> jax.Array | Stacked:
    """A plain array as is (cast to ``dtype``); a ``QuantWeight`` as ``q * scale`` in ``dtype``;
    a ``Stacked`` view of ``dtype`` stays a view (``project`` reads it), else is sliced."""
    if isinstance(w, QuantWeight):
        return dequantize(dense(w.q), dense(w.scale), dtype)
    if isinstance(w, Stacked):
        return w if w.dtype == jnp.dtype(dtype) else w.materialize().astype(dtype)
    return w.astype(dtype)


def get_weight(
    name: str,
    shape: tuple[int, ...],
    dtype: jnp.dtype,
    init: hk.initializers.Initializer,
    *,
    quant: str | None,
    in_dims: tuple[int, ...],
) -> jax.Array | QuantWeight:
    """A matrix parameter, plain or quantised (``quant`` = "fp8" or "int8").

    A quantised weight is two parameters: ``name`` (float8/int8, ``shape``) and
    ``name + "_scale"`` (float32, ``scale_shape(shape, in_dims)``). ``in_dims`` are the
    contracted (input) dims of ``shape``, as seen inside the module (no layer axis).
    """
    if quant is None:
        return hk.get_parameter(name, shape, dtype, init=init)
    q = hk.get_parameter(name, shape, QUANT_DTYPES[quant], init=jnp.zeros)
    s = hk.get_parameter(name + "_scale", scale_shape(shape, in_dims), jnp.float32, init=jnp.ones)
    return QuantWeight(q, s)
