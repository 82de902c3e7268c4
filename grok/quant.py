"""Quantisation in one place: FP8 (e4m3) and int8, per tensor, per channel and in blocks.

A quantised matrix is ``W = q * scale``: ``q`` float8_e4m3fn or int8, ``scale`` float32.

- per tensor: one scale (shape [] or with every dim 1);
- per channel: one scale per output channel, the ``in`` dims reduced to 1
  (``scale_shape``), as the model keeps FP8/int8 weights on the device;
- blocks: one scale per ``FP8_BLOCK`` x ``FP8_BLOCK`` tile of a 2-D ``[out, in]`` matrix
  (the last row and column of tiles possibly partial), as re-published FP8 checkpoints
  store them (``<name>_scale_inv``).

The scale maps each group's largest magnitude to the format's largest value (448 for
e4m3, 127 for int8); an all-zero group gets scale 1 so it is always a usable divisor.
Every function takes numpy or JAX arrays and returns the same kind, so the loader (on the
host or on the device), the Grok-1 path and the layers share them.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448, the largest finite e4m3
INT8_MAX = 127  # symmetric int8: -127 .. 127
FP8_BLOCK = 128  # side of the square tiles that one ``_scale_inv`` entry covers
QUANT_DTYPES = {"fp8": jnp.float8_e4m3fn, "int8": jnp.int8}
QMAX = {"fp8": E4M3_MAX, "int8": float(INT8_MAX)}

Array = np.ndarray | jax.Array


def _xp(x: Array):
    return jnp if isinstance(x, jax.Array) else np


def _divide(a: Array, b: Array) -> Array:
    """``a / b`` as true IEEE division, on the host and on the device alike.

    XLA rewrites a division by a constant or a broadcast value into a multiplication by its
    reciprocal, which differs from numpy in the last bit for about half the values and so
    flips FP8 codes; behind an optimisation barrier the divisor stays a plain array (a
    temporary of ``a``'s size), so both quantisers agree bit for bit.
    """
    if not isinstance(a, jax.Array):
        return a / b
    shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b))
    return a / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, a.dtype), shape))


def scale_shape(shape: Sequence[int], in_dims: Sequence[int]) -> tuple[int, ...]:
    """The per-output-channel scale's shape: ``shape`` with the ``in_dims`` set to 1."""
    return tuple(1 if d in in_dims else n for d, n in enumerate(shape))


def scale_from_amax(amax: Array, kind: str) -> Array:
    """amax / qmax (the largest value maps to the format's largest); 1 where amax is 0."""
    xp = _xp(amax)
    amax = amax.astype(np.float32)
    scale = _divide(amax, np.float32(QMAX[kind]))
    return xp.where(amax > 0, scale, np.float32(1)).astype(np.float32)


def _cast(scaled: Array, kind: str) -> Array:
    """float32 values already divided by their scale -> q, saturating (int8: rounded)."""
    xp = _xp(scaled)
    qmax = np.float32(QMAX[kind])
    if kind == "int8":
        scaled = xp.rint(scaled)
    return xp.clip(scaled, -qmax, qmax).astype(QUANT_DTYPES[kind])


def quantize(w: Array, kind: str, in_dims: Sequence[int] | None = None) -> tuple[Array, Array]:
    """``w`` -> (q, float32 scale), ``W ~= q * scale``.

    ``in_dims``: the dims reduced into one scale (per channel: the input dims, the scale
    keeps them as size 1); None: per tensor (a scale of shape []).
    """
    xp = _xp(w)
    w = w.astype(np.float32)
    if in_dims is None:
        scale = scale_from_amax(xp.max(xp.abs(w)), kind)
    else:
        scale = scale_from_amax(xp.max(xp.abs(w), axis=tuple(in_dims), keepdims=True), kind)
    return _cast(_divide(w, scale), kind), scale


def dequantize(q: Array, scale: Array, dtype=np.float32) -> Array:
    """``q * scale`` in float32, cast to ``dtype``; ``scale`` broadcasts (per tensor/channel)."""
    return (q.astype(np.float32) * scale).astype(dtype)


def block_scales(scale_inv: np.ndarray, rows: slice, cols: slice, block: int = FP8_BLOCK):
    """Per-element float32 scales of the region ``[rows, cols]`` from a tile grid (numpy)."""
    r = np.arange(rows.start, rows.stop) // block  # [r]
    c = np.arange(cols.start, cols.stop) // block  # [c]
    return np.asarray(scale_inv, np.float32)[r[:, None], c[None, :]]


def quantize_blocks(w: np.ndarray, kind: str = "fp8", block: int = FP8_BLOCK):
    """2-D ``w`` [out, in] -> (q, scale_inv float32 [ceil(out/block), ceil(in/block)]).

    Each tile gets its own amax scale; ``dequantize_blocks`` inverts it.
    """
    w = np.asarray(w, np.float32)
    rows, cols = w.shape
    grid = (-(-rows // block), -(-cols // block))
    padded = np.zeros((grid[0] * block, grid[1] * block), np.float32)
    padded[:rows, :cols] = np.abs(w)
    amax = padded.reshape(grid[0], block, grid[1], block).max(axis=(1, 3))
    scale_inv = scale_from_amax(amax, kind)
    q = _cast(w / block_scales(scale_inv, slice(0, rows), slice(0, cols), block), kind)
    return q, scale_inv


def dequantize_blocks(q: np.ndarray, scale_inv: np.ndarray, dtype=np.float32, block=FP8_BLOCK):
    """``q`` [out, in] times its tile scales, as ``dtype``."""
    rows, cols = q.shape
    s = block_scales(scale_inv, slice(0, rows), slice(0, cols), block)
    return dequantize(q, s, dtype)
