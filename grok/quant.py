"""Quantisation in one place: FP8 (e4m3) and int8, per tensor, per channel and in blocks.

A quantised matrix is ``W = q * scale``: ``q`` float8_e4m3fn or int8, ``scale`` float32.

- per tensor: one scale (shape [] or with every dim 1);
- per channel: one scale per output channel, the ``in`` dims reduced to 1
  (``scale_shape``), as the model keeps FP8/int8 weights on the device;
- blocks: one scale per ``FP8_BLOCK`` x ``FP8_BLOCK`` tile of a 2-D ``[out, in]`` matrix
  (the last row and column of tiles possibly partial), as re-published FP8 checkpoints
  store them (``<name>_scale_inv``);
- row blocks: one scale per output channel and ``FP8_BLOCK`` inputs (the ``in`` dims
  flattened, the last block possibly partial), the scale ``[out..., G]``: how the model keeps
  a tiled checkpoint's codes and scales as they are (each tile's scale repeated over its rows).

The model's modes (``QUANT_MODES``, the ``quantize=`` of a load): ``"fp8"`` and ``"int8"``
per channel, ``"fp8-block"`` e4m3 in row blocks.

The scale maps each group's largest magnitude to the format's largest value (448 for
e4m3, 127 for int8); an all-zero group gets scale 1 so it is always a usable divisor.
Every function takes numpy or JAX arrays and returns the same kind, so the loader (on the
host or on the device), the Grok-1 path and the layers share them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448, the largest finite e4m3
INT8_MAX = 127  # symmetric int8: -127 .. 127
FP8_BLOCK = 128  # side of the square tiles that one ``_scale_inv`` entry covers
# The model's quantised modes: their codes' dtype; "fp8-block" keeps a scale per output
# channel and FP8_BLOCK inputs, so a tiled checkpoint's scales load as they are.
QUANT_DTYPES = {"fp8": jnp.float8_e4m3fn, "fp8-block": jnp.float8_e4m3fn, "int8": jnp.int8}
QUANT_MODES = tuple(QUANT_DTYPES)
QMAX = {"fp8": E4M3_MAX, "fp8-block": E4M3_MAX, "int8": float(INT8_MAX)}

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


def row_blocks(mode: str | None) -> bool:
    """Whether ``mode`` keeps a scale per output channel and ``FP8_BLOCK`` inputs."""
    return mode == "fp8-block"


def scale_shape(shape: Sequence[int], in_dims: Sequence[int], mode: str = "fp8") -> tuple[int, ...]:
    """The model's scale shape for a weight ``shape`` whose trailing ``in_dims`` are its
    inputs: per output channel, ``shape`` with the ``in_dims`` set to 1; in row blocks
    (``mode`` "fp8-block"), the ``in_dims`` replaced by one axis of ceil(inputs / FP8_BLOCK)."""
    if not row_blocks(mode):
        return tuple(1 if d in in_dims else n for d, n in enumerate(shape))
    n_out = len(shape) - len(in_dims)
    if tuple(in_dims) != tuple(range(n_out, len(shape))):
        raise ValueError(f"row blocks need trailing in dims, got {in_dims} of {shape}")
    return (*shape[:n_out], -(-math.prod(shape[n_out:]) // FP8_BLOCK))


def scale_partition(
    entries: Sequence, shape: Sequence[int], in_dims: Sequence[int], mode: str
) -> tuple:
    """A weight's scale's sharding in ``mode`` (a PartitionSpec's entries, one per dim of
    ``scale_shape``) from that of its per-channel scale (``entries``, the in dims unsplit):
    row blocks keep the out dims' entries and leave the blocks whole."""
    if not row_blocks(mode):
        return tuple(entries)
    n_out = len(shape) - len(in_dims)
    padded = tuple(entries) + (None,) * (len(shape) - len(entries))
    return (*padded[:n_out], None)


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

    ``kind``: a mode of ``QUANT_MODES``. ``in_dims``: the dims reduced into one scale (per
    channel: the input dims, the scale keeps them as size 1; "fp8-block": the trailing input
    dims, reduced per ``FP8_BLOCK`` of them, ``scale_shape``); None: per tensor (a scale of
    shape []).
    """
    xp = _xp(w)
    w = w.astype(np.float32)
    if in_dims is None:
        scale = scale_from_amax(xp.max(xp.abs(w)), kind)
    elif row_blocks(kind):
        blocks = _row_blocks(xp.abs(w), scale_shape(w.shape, in_dims, kind))  # [..., G, B]
        scale = scale_from_amax(xp.max(blocks, axis=-1), kind)
        return _cast(_divide(w, _expand(scale, w.shape)), kind), scale
    else:
        scale = scale_from_amax(xp.max(xp.abs(w), axis=tuple(in_dims), keepdims=True), kind)
    return _cast(_divide(w, scale), kind), scale


def _row_blocks(w: Array, s_shape: tuple[int, ...]) -> Array:
    """``w`` [out..., in...] as [out..., G, FP8_BLOCK]: its inputs flattened, zero-padded to
    G blocks (``s_shape`` = [out..., G])."""
    xp = _xp(w)
    n_in = math.prod(w.shape) // math.prod(s_shape[:-1])
    flat = w.reshape(*s_shape[:-1], n_in)
    pad = s_shape[-1] * FP8_BLOCK - n_in
    if pad:
        flat = xp.concatenate([flat, xp.zeros((*s_shape[:-1], pad), flat.dtype)], axis=-1)
    return flat.reshape(*s_shape, FP8_BLOCK)


def _broadcasts(scale: Array, shape: tuple[int, ...]) -> bool:
    """Whether ``scale`` is per tensor or per channel for a weight ``shape`` (its own rank,
    each dim 1 or the weight's), not in row blocks."""
    s = np.shape(scale)
    if len(s) != len(shape):
        return len(s) == 0
    return all(a in (1, b) for a, b in zip(s, shape, strict=True))


def mode_of(params: dict, requested: str | None) -> str | None:
    """The mode a load asking for ``requested`` gave ``params`` (a Haiku tree): an FP8
    checkpoint's tiled scales kept as row blocks make "fp8" "fp8-block" (seen from any scale
    that is not per channel: o_proj's, at least, has another rank)."""
    if requested not in ("fp8", "fp8-block"):
        return requested
    for module in params.values():
        for name, scale in module.items():
            w = module.get(name.removesuffix("_scale"))
            if name.endswith("_scale") and w is not None and not _broadcasts(scale, w.shape):
                return "fp8-block"
    return "fp8"


def _expand(scale: Array, shape: tuple[int, ...]) -> Array:
    """A scale as one per element of a weight ``shape``, or one that broadcasts to it: row
    blocks ([out..., G], ``scale_shape``) repeated over their inputs, any other as it is."""
    if _broadcasts(scale, shape):
        return scale
    xp = _xp(scale)
    n_out = scale.ndim - 1
    n_in = math.prod(shape[n_out:])
    if tuple(scale.shape) != (*shape[:n_out], -(-n_in // FP8_BLOCK)):
        raise ValueError(f"scale {tuple(scale.shape)} for a weight {tuple(shape)}")
    full = xp.repeat(scale, FP8_BLOCK, axis=-1)[..., :n_in]  # [out..., in]
    return full.reshape(shape)


def dequantize(q: Array, scale: Array, dtype=np.float32) -> Array:
    """``q * scale`` in float32, cast to ``dtype``; ``scale`` per tensor or channel
    (broadcast) or in row blocks ([out..., G], see ``scale_shape``)."""
    return (q.astype(np.float32) * _expand(scale, q.shape)).astype(dtype)


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
