"""The model's operations on one CPU device, as native kernel calls (``ffi``) where a kernel
applies and as XLA's otherwise, with what it takes to feed XLA:CPU well: weights read where
they lie (``Stacked`` views, ``QuantStacked`` for codes and their scales) and 16-bit floats
moved as their uint16 bits.

Glossary: B batch, T query positions, S cache slots, K kv heads, H head dim, L layers,
V vocab, D model width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from grok.kernels.cpu import ffi
from grok.kernels.cpu.build import available, available_codes
from grok.kernels.xla import XlaKernels, paged_rows, paged_write_layer, take
from grok.kv_cache import KVCache, LayerCache
from grok.layers import QuantWeight
from grok.quant import dequantize

# XLA:CPU's float normalisation treats a bf16 (or f16) slice, update or gather as unsupported:
# it converts the whole array to float32 around it, and hoists that conversion out of loops.
# The same bits seen as uint16 stay 16-bit. ``as_bits``/``from_bits`` make those views; a
# bitcast moves no data.
_BIT_VIEWS = {jnp.dtype(jnp.bfloat16): jnp.uint16, jnp.dtype(jnp.float16): jnp.uint16}


def as_bits(x: jax.Array) -> jax.Array:
    """A 16-bit float array as its uint16 view; anything else unchanged."""
    bits = _BIT_VIEWS.get(jnp.dtype(x.dtype))
    return x if bits is None else jax.lax.bitcast_convert_type(x, bits)


def from_bits(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Undoes ``as_bits``: a uint16 view back to the 16-bit float ``dtype``."""
    if x.dtype == jnp.uint16 and jnp.dtype(dtype) in _BIT_VIEWS:
        return jax.lax.bitcast_convert_type(x, dtype)
    return x


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Stacked:
    """One weight inside a stacked array, not sliced out yet: ``array[index]``.

    On XLA:CPU a slice of a stacked ``[L, ...]`` weight is a copy made before the matmul that
    reads it, so the layer loop hands the layers these views instead; the kernels read one in
    place, and ``materialize`` slices it out for every other use.

    ``array`` is [*lead, ...] (a 16-bit float may be its uint16 bits, ``as_bits``), ``index``
    one int32 scalar per leading axis taken so far, ``dtype`` the weight's own dtype.
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
        return from_bits(take(as_bits(self.array), self.index), self.dtype)

    def astype(self, dtype: jnp.dtype) -> jax.Array:
        return self.materialize().astype(dtype)

    def dequantized(self, scale: Stacked, dtype: jnp.dtype) -> QuantStacked:
        """These codes times ``scale`` as a weight of ``dtype``, still unread (``dequant``'s
        hook, ``grok.layers``)."""
        return QuantStacked(self, scale, jnp.dtype(dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantStacked:
    """A quantised weight inside stacked arrays, as the weight it stands for: ``codes *
    scale`` in ``dtype``, not read yet. The quantised kernels read the codes and scales in
    place; ``materialize`` dequantises a copy for every other use.

    ``codes`` and ``scale`` are ``Stacked`` views at the same indices, shaped as a
    ``QuantWeight``'s q and scale (``grok.quant.scale_shape``).
    """

    codes: Stacked
    scale: Stacked
    dtype: jnp.dtype = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape

    @property
    def ndim(self) -> int:
        return self.codes.ndim

    def __getitem__(self, index) -> QuantStacked:
        return QuantStacked(self.codes[index], self.scale[index], self.dtype)

    def reshape(self, rows: int, cols: int) -> QuantStacked:
        """The weight as an [O, I] matrix (its trailing dims flattened into I): the codes
        reshaped, the scale to [O, 1] (per channel) or [O, G] (row blocks)."""
        size = math.prod(self.scale.shape)
        return QuantStacked(
            self.codes.reshape(rows, cols), self.scale.reshape(rows, size // rows), self.dtype
        )

    def materialize(self) -> jax.Array:
        return dequantize(self.codes.materialize(), self.scale.materialize(), self.dtype)

    def astype(self, dtype: jnp.dtype) -> jax.Array:
        return self.materialize().astype(dtype)


def stacked(array: jax.Array, dtype: jnp.dtype | None = None) -> Stacked:
    """A ``Stacked`` view of a whole array (``dtype``: its own dtype when ``array`` holds its
    uint16 bits)."""
    return Stacked(array, (), jnp.dtype(dtype or array.dtype))


# Up to this many ids (decode) ``embed`` slices rows one by one instead of gathering.
ROWS_BY_SLICE = 16


@dataclasses.dataclass(frozen=True)
class CpuKernels(XlaKernels):
    """The seam's operations on one CPU device (see ``grok.kernels.base.Kernels``): the native
    kernels where they apply, XLA's path (``XlaKernels``, with its CPU choices) elsewhere.

    The layer loop reads the stacked per-layer weights through ``Stacked`` views instead of
    slicing each layer's out (the same parameters and results without a copy of every weight
    per step), and carries the whole KV cache as uint16 bits, each layer writing its new keys
    and values where they lie and reading its own layer in place (the attention kernel).

    ``native``: whether the native kernels may run (``build.available`` for the model's dtype);
    without them the views and bits still feed XLA:CPU (a bf16 decode step ran about a third
    slower on XLA's plain path: the bit views keep its 16-bit slices, gathers and cache
    updates from being converted to float32 whole).
    """

    platform: str | None = "cpu"
    native: bool = True

    def _native(self, dtype: jnp.dtype) -> bool:
        """Whether a kernel call for ``dtype`` operands may be made."""
        return self.native and available(dtype)

    # The layer loop.

    def loop_weights(self, params: dict) -> tuple[Any, Any]:
        return None, params  # fixed: every step reads the stacked arrays in place

    def weights_at(self, scanned: Any, fixed: dict, layer: jax.Array) -> dict:
        """Matrices as ``Stacked`` views at ``layer``; vectors (the norms' weights) sliced."""
        return {
            module: {
                name: stacked(x)[layer] if x.ndim > 2 else stacked(x)[layer].materialize()
                for name, x in leaves.items()
            }
            for module, leaves in fixed.items()
        }

    def layer_experts(self, w, layer: jax.Array):
        # ``view[e]`` takes layer and expert together: a decode step reads only the chosen
        # expert's weights, in place through the kernel (codes and scales alike).
        if isinstance(w, QuantWeight):
            return QuantWeight(stacked(w.q)[layer], stacked(w.scale)[layer])
        return stacked(w)[layer]

    def dense(self, w):
        if isinstance(w, (Stacked, QuantStacked)):
            return w.materialize()
        if isinstance(w, QuantWeight):
            return QuantWeight(self.dense(w.q), self.dense(w.scale))
        return super().dense(w)

    def embed(self, table: jax.Array, ids: jax.Array) -> jax.Array:
        """Through ``as_bits``: a bf16 gather made XLA:CPU convert the whole table to float32.
        A few ids (decode) are sliced one row at a time: a gather of the uint16 view made
        XLA:CPU copy the whole table first, every decode step (32 MB per token on
        bench-grok1); a slice reads its row in place."""
        bits = as_bits(table)  # [V, D]
        if ids.size > ROWS_BY_SLICE:
            return from_bits(bits[ids], table.dtype)
        flat = ids.reshape(-1)
        rows = [jax.lax.dynamic_slice_in_dim(bits, flat[i], 1) for i in range(flat.shape[0])]
        return from_bits(jnp.concatenate(rows).reshape(*ids.shape, table.shape[1]), table.dtype)

    # Products.

    def project(self, equation, x, w, out_dtype=None) -> jax.Array:
        if isinstance(w, QuantWeight) and isinstance(w.q, Stacked):  # codes read in place
            w = w.q.dequantized(w.scale, x.dtype)
        y = _native_product(equation, x, w) if self._native(x.dtype) else None
        if y is not None:
            return y.astype(out_dtype or x.dtype)
        return super().project(equation, x, self.dense(w), out_dtype)

    def grouped(self, xs, w, sizes, row_group, in_axis) -> jax.Array:
        if (
            in_axis == 2
            and isinstance(w, QuantWeight)
            and isinstance(w.q, Stacked)
            and w.q.ndim == 3
            and self.native
            and available_codes(xs.dtype, w.q.array.dtype)
        ):
            e, o, i = w.q.shape
            scale = w.scale.reshape(e, o, math.prod(w.scale.shape) // (e * o))  # [E, O, G]
            return ffi.quant_grouped_matvec(xs, w.q.array, scale.array, sizes, w.q.index)
        if (
            in_axis == 2  # [G, Out, In]: the kernel's layout
            and not isinstance(w, QuantWeight)
            and w.ndim == 3
            and jnp.dtype(xs.dtype) == jnp.dtype(w.dtype)
            and self._native(xs.dtype)
        ):
            array, index = (w.array, w.index) if isinstance(w, Stacked) else (w, ())
            return ffi.grouped_matvec(xs, array, sizes, index)
        return super().grouped(xs, w, sizes, row_group, in_axis)

    def expert_path(self, tokens: int, assignments: int, experts: int) -> str:
        if not self.native:
            return super().expert_path(tokens, assignments, experts)
        # A grouped product reads each chosen expert once, in place, for its own rows only: no
        # padding, no copies. One token indexes its k experts directly (measured 10% faster at
        # batch-1 decode).
        return "ragged" if tokens > 1 else "gather"

    # Attention and the KV cache.

    def attend(self, q, keys, values, tau, positions, lengths, *, scale, cap) -> jax.Array:
        """The native kernel where it exists for the dtype (its scores in cache-sized tiles:
        on bench-grok1, bf16, T 128, XLA spent about a fifth of the prefill on layout copies
        and elementwise passes over the [B, K, G, T, S] scores), else XLA's. Keys and values
        from ``cache_write`` are read in place (a decode step: not differentiable); fresh ones
        take the kernel with the XLA path's gradient."""
        if not (
            q.dtype == keys.dtype == values.dtype and q.shape[-1] % 2 == 0 and self._native(q.dtype)
        ):
            keys, values = self.dense(keys), self.dense(values)
            return super().attend(q, keys, values, tau, positions, lengths, scale=scale, cap=cap)
        if not isinstance(keys, Stacked):
            return ffi.attention(q, keys, values, tau, positions, lengths, scale=scale, cap=cap)
        if any(a is not b for a, b in zip(keys.index, values.index, strict=True)):
            raise ValueError("attend: keys and values at different indices")
        bits = keys.array.dtype == jnp.uint16  # a 16-bit cache held as bits: q likewise
        out = ffi.attention(
            as_bits(q) if bits else q,
            keys.array,
            values.array,
            tau,
            positions,
            lengths,
            scale=scale,
            cap=cap,
            index=keys.index,
        )
        return from_bits(out, keys.dtype)

    def cache_write(self, cache: LayerCache, k, v, start):
        def put(whole: jax.Array, new: jax.Array) -> jax.Array:
            new = as_bits(new.astype(cache.dtype))  # as the carried cache holds it
            # Row by row (B is static and small): a vmap over the batch axis made XLA:CPU
            # transpose the whole cache twice per layer.
            for b in range(new.shape[0]):
                at = (cache.layer, jnp.int32(b), start[b], jnp.int32(0), jnp.int32(0))
                whole = jax.lax.dynamic_update_slice(whole, new[b][None, None], at)
            return whole

        cache = dataclasses.replace(cache, k=put(cache.k, k), v=put(cache.v, v))
        # This layer's keys and values, each [B, S, K, H], as views of the whole cache: the
        # attention kernel reads them in place, ``dense`` slices them out (as uint16 bits).
        keys = Stacked(cache.k, (cache.layer,), cache.dtype)
        values = Stacked(cache.v, (cache.layer,), cache.dtype)
        return cache, keys, values

    def paged_write(self, cache: LayerCache, k, v, start) -> LayerCache:
        """Through the page tables as the XLA path writes, in the carried form (uint16 bits
        for a 16-bit cache)."""

        def put(whole: jax.Array, new: jax.Array) -> jax.Array:
            new = as_bits(new.astype(cache.dtype))
            return paged_write_layer(whole, cache.layer, new, cache.pages, start)

        return dataclasses.replace(cache, k=put(cache.k, k), v=put(cache.v, v))

    def paged_attend(self, q, cache, tau, positions, lengths, *, scale, cap) -> jax.Array:
        """The native paged kernel (the dense kernel's numerics, its keys and values read in
        place through the page tables) where it exists for the dtype and the page size, else
        XLA's gather of the pages."""
        if self._paged_native(q.dtype, cache):
            bits = cache.k.dtype == jnp.uint16  # a 16-bit cache held as bits: q likewise
            out = ffi.paged_attention(
                as_bits(q) if bits else q,
                cache.k,
                cache.v,
                cache.pages,
                tau,
                positions,
                lengths,
                scale=scale,
                cap=cap,
                index=(cache.layer,),
            )
            return from_bits(out, cache.dtype)
        keys, values = (
            from_bits(paged_rows(pool, cache.layer, cache.pages), cache.dtype)
            for pool in (cache.k, cache.v)
        )
        return XlaKernels.attend(
            self, q, keys, values, tau, positions, lengths, scale=scale, cap=cap
        )

    def _paged_native(self, dtype: jnp.dtype, cache: LayerCache) -> bool:
        """Whether the paged kernel takes ``dtype`` queries over ``cache``'s pool."""
        page_size, head_dim = cache.k.shape[2], cache.k.shape[-1]
        return (
            jnp.dtype(dtype) == jnp.dtype(cache.dtype)
            and page_size % ffi.PAGE_MULTIPLE == 0
            and head_dim % 2 == 0
            and self._native(dtype)
        )

    def paged_width(self, pages: int, most: int, page_size: int) -> int:
        if self.native and page_size % ffi.PAGE_MULTIPLE == 0:
            return most  # the kernel reads only the pages below each row's length
        return super().paged_width(pages, most, page_size)

    def carry(self, cache: KVCache) -> KVCache:
        """k and v as uint16 bits where they are 16-bit floats: the model reads and writes the
        cache as bits, so in a decode loop ``uncarry`` at a step's start and ``carry`` at its
        end cancel out, where a bf16 cache made XLA:CPU copy the whole of it four times per
        step (bench-grok1 bf16, 12000 tokens: 14.5 -> 8.8 ms per token)."""
        return dataclasses.replace(cache, k=as_bits(cache.k), v=as_bits(cache.v))

    def uncarry(self, cache: KVCache, dtype: jnp.dtype) -> KVCache:
        return dataclasses.replace(cache, k=from_bits(cache.k, dtype), v=from_bits(cache.v, dtype))


def _native_any_rows(w) -> bool:
    """Whether the kernel also takes prefill-sized products of ``w``: a bfloat16 ``Stacked``
    view, read in place, beat slicing it out for XLA's bf16 GEMM (bench-grok1 prefill at batch
    8: 135-140 against 145-148 ms); for float32 XLA's GEMM was 2-4% faster."""
    return isinstance(w, Stacked) and w.dtype == jnp.dtype(jnp.bfloat16)


def _native_product(equation: str, x: jax.Array, w) -> jax.Array | None:
    """``x [..., I] . w [O, I]`` (float32 [..., O]) by the native kernel (the caller has checked
    that it may run), or None where it does not apply (too many rows, another equation or
    dtype, a quantised weight other than a ``QuantStacked`` the quantised kernels take)."""
    if isinstance(w, QuantWeight) or w.ndim != 2 or jnp.dtype(x.dtype) != jnp.dtype(w.dtype):
        return None
    inputs, out_letters = equation.split("->")
    x_letters, w_letters = inputs.split(",")
    if (
        len(w_letters) != 2
        or x_letters[-1] != w_letters[1]
        or out_letters != x_letters[:-1] + w_letters[0]
    ):
        return None
    rows = math.prod(x.shape[:-1])
    x2 = x.reshape(rows, x.shape[-1])  # [rows, I]
    if isinstance(w, QuantStacked):  # codes read in place at any row count
        if not available_codes(x.dtype, w.codes.array.dtype):
            return None
        y = ffi.quant_matvec(x2, w.codes.array, w.scale.array, w.codes.index)
    elif rows > ffi.MAX_ROWS and not _native_any_rows(w):
        return None
    else:
        array, index = (w.array, w.index) if isinstance(w, Stacked) else (w, ())
        y = ffi.matvec(x2, array, index)  # [rows, O]
    return y.reshape(*x.shape[:-1], w.shape[0])
