"""FP8 weights in a checkpoint: their scales, where they are dequantised, and the jitted steps.

A re-published FP8 checkpoint stores a float8 ``<name>`` beside ``<name>_scale`` (per tensor
or per output row) or ``<name>_scale_inv`` (128x128 blocks), each TP slice with its own
(spec section 4). Two ways to dequantise:

- on the device (``device_scales``, ``dequantize_fn``): the 1-byte codes are copied into the
  shard buffers as they are and multiplied by their scales after placement, every scale kind
  put as one small grid and two index maps;
- on the host (``codes_to_float32``, ``scale_on_host``): unit by unit as the codes are copied,
  by a 256-entry lookup and a multiply.

``on_device`` picks between them. ``quantize="fp8"`` of a float weight (stored as float8
with per-output-channel scales) is one jitted update a layer at a time (``quantize_into_fn``);
of an FP8 weight whose scales the model's layout holds exactly (``fits``: per tensor or
channel, or 128 x 128 tiles as "fp8-block"'s row blocks), the codes are copied as bytes and
the scales rearranged on the host (``kept_codes`` decides which, and the mode).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grok.checkpoint.files import CheckpointFiles
from grok.checkpoint.plan import ParamPlan
from grok.kernels.cpu import host
from grok.params import WeightSpec
from grok.quant import (
    FP8_BLOCK,
    QUANT_DTYPES,
    block_scales,
    dequantize,
    quantize,
    row_blocks,
    scale_shape,
)

FLOAT_DTYPES = {
    np.dtype(jnp.bfloat16),
    np.dtype(np.float16),
    np.dtype(np.float32),
    np.dtype(np.float64),
}
FP8_DTYPES = {np.dtype(jnp.float8_e4m3fn), np.dtype(jnp.float8_e5m2)}
SCALE_SUFFIXES = ("_scale", "_scale_inv")
# float32 value of every FP8 code: a lookup is 5.5x faster than ml_dtypes' cast (0.44 vs
# 0.08 G elements/s on this machine) and gives the same values.
_FP8_VALUES = {dt: np.arange(256, dtype=np.uint8).view(dt).astype(np.float32) for dt in FP8_DTYPES}


def is_block_scale(scale_name: str) -> bool:
    """Whether a scale tensor holds 128x128 tiles (``_scale_inv``), not per tensor/row."""
    return scale_name.endswith("_scale_inv")


# On the host.
def codes_to_float32(codes: np.ndarray) -> np.ndarray:
    """FP8 ``codes`` (any shape) as their float32 values, by lookup."""
    return _FP8_VALUES[codes.dtype].take(codes.view(np.uint8))


def scale_on_host(
    values: np.ndarray, scale: np.ndarray, blocks: bool, rows: slice, cols: slice, n_cols: int
) -> None:
    """Multiplies float32 ``values`` = weight[rows, cols] (weight [R, n_cols]) by its scales.

    ``scale``: the weight's scale tensor, 128x128 tiles if ``blocks``, else per tensor or
    per output row.
    """
    s = np.asarray(scale, np.float32)
    if not blocks:
        values *= s.reshape(()) if s.size == 1 else s.reshape(-1)[rows, None]
        return
    # One 128-row band of tiles at a time: a [cols] row of scales broadcast over the band.
    r0, r1 = rows.start, rows.stop
    c0, c1 = cols.indices(n_cols)[:2]
    for band in range(r0 // FP8_BLOCK, -(-r1 // FP8_BLOCK)):
        lo, hi = max(r0, band * FP8_BLOCK), min(r1, (band + 1) * FP8_BLOCK)
        row = block_scales(s, slice(band * FP8_BLOCK, band * FP8_BLOCK + 1), slice(c0, c1))
        values[lo - r0 : hi - r0] *= row


# On the device.
@dataclasses.dataclass(frozen=True)
class DeviceScales:
    """How a parameter's FP8 codes are dequantised on the device.

    The scale of unit ``u``'s element (out index o, in index i) is ``grid[u][rows[o], cols[i]]``.

    Attributes:
      codes_dtype: the codes' float8 dtype (the same in every unit).
      grid: float32 [*lead, R, C], every unit's scales.
      rows: int32 [out...], the grid row of each output index.
      cols: int32 [in...], the grid column of each input index.
    """

    codes_dtype: np.dtype
    grid: np.ndarray
    rows: np.ndarray
    cols: np.ndarray


def device_scales(
    files: CheckpointFiles, scales: dict[str, str], spec: WeightSpec
) -> DeviceScales | None:
    """``spec``'s scales as a ``DeviceScales``, or None (dequantised on the host then).

    Every kind (per tensor, per channel, 128x128 blocks, per TP slice) becomes one small grid
    and two index maps. None where the weight is not FP8 in every unit, or its units or TP
    slices lay out their scales differently. ``scales``: {FP8 weight name: its scale's name}.
    """
    if not spec.matrix:
        return None
    lead_shape = spec.shape[: spec.lead]
    names = [spec.unit_name(u) for u in itertools.product(*map(range, lead_shape))]
    if not all(n in scales for n in names):
        return None
    dtypes = {e.dtype for n in names for e in files.entries(n)}
    if len(dtypes) != 1:
        return None
    grids, first = [], None
    for name in names:
        unit = _scale_grid(files, scales[name], name, spec)
        if unit is None:
            return None
        if first is None:
            first = unit
        elif unit[0].shape != first[0].shape or not (
            np.array_equal(unit[1], first[1]) and np.array_equal(unit[2], first[2])
        ):
            return None
        grids.append(unit[0])
    k = len(spec.unit_shape) - spec.in_axes
    grid = np.stack(grids).reshape(*lead_shape, *first[0].shape)
    rows = first[1].astype(np.int32).reshape(spec.unit_shape[:k])
    cols = first[2].astype(np.int32).reshape(spec.unit_shape[k:])
    return DeviceScales(dtypes.pop(), grid, rows, cols)


def _scale_grid(files: CheckpointFiles, scale_name: str, name: str, spec: WeightSpec):
    """(grid [R, C], row map [rows], col map [cols]) of ``name``'s stitched scales.

    Each TP slice's scales as a grid with maps from its rows and columns, joined along
    ``spec.tp_dim``; None where the slices' maps along the other dim differ.
    """
    parts = []
    for e in files.entries(name):
        s = np.asarray(files.view(files.entry(scale_name, e.rank)), np.float32)
        n_r, n_c = e.shape
        if is_block_scale(scale_name):
            r, c = np.arange(n_r) // FP8_BLOCK, np.arange(n_c) // FP8_BLOCK
            parts.append((s.reshape(-(-n_r // FP8_BLOCK), -1), r, c))
        elif s.size == 1:
            parts.append((s.reshape(1, 1), np.zeros(n_r, np.int64), np.zeros(n_c, np.int64)))
        else:
            parts.append((s.reshape(n_r, 1), np.arange(n_r), np.zeros(n_c, np.int64)))
    if len(parts) == 1:
        return parts[0]
    d = spec.tp_dim  # the grids join along it; the maps along the other dim must agree
    other = 1 - d
    if any(
        p[0].shape[other] != parts[0][0].shape[other]
        or not np.array_equal(p[1 + other], parts[0][1 + other])
        for p in parts
    ):
        return None
    offsets = np.cumsum([0] + [p[0].shape[d] for p in parts[:-1]])
    joined = np.concatenate([p[1 + d] + o for p, o in zip(parts, offsets, strict=True)])
    grid = np.concatenate([p[0] for p in parts], axis=d)
    maps = [joined, parts[0][2]] if d == 0 else [parts[0][1], joined]
    return grid, maps[0], maps[1]


# Kept as they are.
def fits(device: DeviceScales | None, mode: str) -> bool:
    """Whether the model's scale in ``mode`` ("fp8"/"fp8-block") holds these FP8 scales
    exactly, so that the codes load as they are: float8_e4m3fn codes whose row's scales do not
    differ along its inputs ("fp8") or within a block of 128 of them ("fp8-block": tiles and
    TP slices on 128-input boundaries of the stitched row)."""
    if device is None or device.codes_dtype != np.dtype(QUANT_DTYPES["fp8"]):
        return False
    cols, grid = device.cols.reshape(-1), device.grid  # [I], [*lead, R, C]
    width = FP8_BLOCK if row_blocks(mode) else cols.size  # inputs under one kept scale
    for g0 in range(0, cols.size, width):
        used = np.unique(cols[g0 : g0 + width])  # the grid columns this block reads
        if used.size > 1 and not np.all(grid[..., used] == grid[..., used[:1]]):
            return False
    return True


def kept_scale(device: DeviceScales, spec: WeightSpec, mode: str) -> np.ndarray:
    """The model's scale of FP8 weight ``spec`` in ``mode`` (``grok.quant.scale_shape``)
    from its checkpoint scales, which ``fits`` that mode."""
    rows, cols = device.rows.reshape(-1), device.cols.reshape(-1)  # [O], [I]
    starts = cols[:: FP8_BLOCK if row_blocks(mode) else cols.size]  # [G]: each block's column
    scale = device.grid[..., rows[:, None], starts[None, :]]  # [*lead, O, G]
    return np.ascontiguousarray(scale.reshape(scale_shape(spec.shape, spec.in_dims, mode)))


def kept_codes(
    quantize: str | None, specs: Sequence[WeightSpec], scales_of: Callable
) -> tuple[str | None, frozenset[str]]:
    """(the mode, the parameters kept as codes) of a load asking for ``quantize``.

    ``scales_of(spec)`` gives a weight's ``DeviceScales`` (None: not FP8 throughout). With
    "fp8", FP8 weights whose scales fit one per output channel are kept; where some fit only
    "fp8-block"'s row blocks (128 x 128 tiles, a column-split slice's own per-channel
    scales) and more are kept so, the load becomes "fp8-block". Kept parameters are named
    ``"module/name"``; the others are quantised from their values.
    """
    if quantize not in ("fp8", "fp8-block"):
        return quantize, frozenset()
    fp8 = [s for s in specs if s.quantized and fits(scales_of(s), "fp8-block")]

    def kept(mode: str) -> frozenset[str]:
        return frozenset(f"{s.module}/{s.name}" for s in fp8 if fits(scales_of(s), mode))

    keep = kept(quantize)
    if quantize == "fp8" and len(keep) < len(fp8):  # some fit only row blocks
        return "fp8-block", kept("fp8-block")
    return quantize, keep


# Where.
def whole(param: ParamPlan) -> bool:
    """Whether ``param``'s codes (all shards this process holds, 1 byte an element) take no
    more memory than its largest device shard of the result: then it is dequantised at once."""
    largest = max(s.size for s in param.shards) * param.build_dtype.itemsize
    return sum(s.size for s in param.shards) <= largest


def on_device(param: ParamPlan, layer: int | None, codes_dtype: np.dtype) -> bool:
    """Whether FP8 ``param`` (``layer`` alone if given) is dequantised on the device.

    Always on an accelerator. On the CPU backend, where "device" work takes the same cores
    as the host's, never where the native library dequantises the codes in the copy threads
    (``grok.kernels.cpu.host``, e4m3): one pass over the bytes as they are copied. Without
    it, only where the whole parameter goes at once: one layer at a time (a sharded
    parameter, each shard smaller than all its codes) loaded at 0.50-0.54 GB/s on the
    (1, 8) mesh against 0.80-0.83 GB/s on the host (scripts/bench_load.py, this 2-core
    machine), the zeroed result and one extra compile per shape costing more than they save.
    """
    device_set = param.sharding.device_set
    if device_set and next(iter(device_set)).platform != "cpu":
        return True
    if np.dtype(codes_dtype) == np.dtype(QUANT_DTYPES["fp8"]) and host.available():
        return False
    return layer is not None or not param.spec.per_layer or whole(param)


# Jitted steps, one compile per (shape, sharding, dtype), shared by the parameters alike.
def _scales_of(codes: jax.Array, grid: jax.Array, rows: jax.Array, cols: jax.Array, lead: int):
    """Per-element scales [*codes.shape]: ``grid[unit][rows[o], cols[i]]`` (``DeviceScales``)."""
    nd = codes.ndim
    index = [
        jnp.arange(codes.shape[j]).reshape([codes.shape[j] if a == j else 1 for a in range(nd)])
        for j in range(lead)
    ]
    index.append(rows.reshape((1,) * lead + rows.shape + (1,) * cols.ndim))
    index.append(cols.reshape((1,) * (lead + rows.ndim) + cols.shape))
    return grid[tuple(index)]


@functools.cache
def dequantize_fn(lead: int, dtype: jnp.dtype, sharding: jax.sharding.Sharding):
    """A jitted ``(codes, grid, rows, cols) -> codes * scales`` as ``dtype`` on ``sharding``.

    The codes are not donated: their 1-byte buffers cannot hold the wider result (the
    caller deletes them instead).
    """

    def dequant(codes, grid, rows, cols):
        return dequantize(codes, _scales_of(codes, grid, rows, cols, lead), dtype)

    return jax.jit(dequant, out_shardings=sharding)


@functools.cache
def dequantize_into_fn(lead: int, dtype: jnp.dtype, sharding: jax.sharding.Sharding):
    """A jitted ``(out, codes, grid, rows, cols, layer) -> out`` with layer [1, ...] written."""

    def update(out, codes, grid, rows, cols, layer):
        w = dequantize(codes, _scales_of(codes, grid, rows, cols, lead), dtype)
        return jax.lax.dynamic_update_slice(out, w, (layer,) + (0,) * (out.ndim - 1))

    return jax.jit(update, donate_argnums=0, out_shardings=sharding)


def quantize_into_fn(in_dims, mode, sharding, scale_sharding):
    """A jitted ``(qs, ss, w, layer) -> (qs, ss)`` writing layer ``w`` [1, ...] quantised.

    Per output channel, or per channel and 128 inputs in "fp8-block" (``mode``; the
    ``in_dims`` reduced, the compiler gathering their max across shards); ``qs``/``ss`` are
    donated, updated in place, and keep their shardings.
    """

    def update(qs, ss, w, layer):
        q, s = quantize(w, mode, in_dims)
        return (
            jax.lax.dynamic_update_slice(qs, q, (layer,) + (0,) * (qs.ndim - 1)),
            jax.lax.dynamic_update_slice(ss, s, (layer,) + (0,) * (ss.ndim - 1)),
        )

    return jax.jit(update, donate_argnums=(0, 1), out_shardings=(sharding, scale_sharding))


def zeros(shape, dtype, sharding) -> jax.Array:
    """A zeroed array to update a layer at a time."""
    return _zeros_fn(tuple(shape), jnp.dtype(dtype), sharding)()


@functools.cache
def _zeros_fn(shape, dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
