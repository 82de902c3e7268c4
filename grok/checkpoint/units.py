"""Copy units: the jobs that fill a device shard's host buffer with file bytes, planned then run.

A shard buffer is in the parameter's own layout, which is the release's ``[out, in]``
reshaped (``grok.params``), so filling it is copying rectangles of the released tensors. For
each layer (and expert) the shard covers, ``shard_units`` finds the TP slices holding its
rows and columns and cuts them into units of about ``UNIT_BYTES``, each a job for one copy
thread (copies out of a memory map release the GIL, so the threads run in parallel):

- most units are a block of rows of one TP slice;
- where TP slices sit side by side in the buffer's columns (w2 on one device), a unit is a
  block of whole rows, every slice's part of them in turn;
- where the shard slices an inner axis of a unit (a head range of o_proj), a unit reads the
  covering region into a temporary and copies the slice out of it.

``Copier.run`` is the one place a unit runs: each part copied as raw bits when the dtypes
agree, else cast (float32 -> bfloat16 in integer ops) or dequantised (e4m3 codes by the native
library's ``grok.kernels.cpu.host.dequantize_fp8``, else FP8 codes -> float32 -> scaled in
numpy), then checked for NaN/Inf (``grok.checkpoint.finite``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np

from grok.checkpoint import fp8
from grok.checkpoint.files import CheckpointFiles, TensorInfo
from grok.checkpoint.finite import NON_FINITE_FROM, all_finite
from grok.checkpoint.fresh import populate
from grok.kernels.cpu import host
from grok.params import WeightSpec, hf_region
from grok.quant import FP8_BLOCK

UNIT_BYTES = 8 << 20  # rows per copy unit: about this many bytes, so big tensors split


@dataclasses.dataclass(frozen=True)
class Part:
    """One rectangle of one TP slice and where it goes.

    Attributes:
      entry: the TP slice (or whole tensor) in its file.
      rows, cols: the rectangle of ``entry``; ``cols`` None: a 1-D tensor, ``rows`` a flat
        range.
      dst: where it goes in the unit's view of the buffer (``CopyUnit``): (rows, cols) of a
        matrix, (range,) of a flat view.
      scale: an FP8 slice's scale tensor (applied where the buffer is not FP8), else None.
    """

    entry: TensorInfo
    rows: slice
    cols: slice | None
    dst: tuple[slice, ...]
    scale: TensorInfo | None = None


@dataclasses.dataclass(frozen=True)
class Gather:
    """A unit whose shard slices an inner axis: its parts fill a temporary ``region`` (the
    covering released rows and columns), which is reshaped to ``shape``
    ``[n_out_1, out_2.., n_in_1, in_2..]`` and sliced by ``post`` into the buffer."""

    region: tuple[int, ...]
    shape: tuple[int, ...]
    post: tuple


@dataclasses.dataclass(frozen=True)
class CopyUnit:
    """One job for a copy thread: parts of one layer's (and expert's) released tensor.

    Attributes:
      pos: the unit's place along the buffer's leading (layer, expert) axes.
      view: the shape ``buffer[pos]`` is viewed as for ``Part.dst``: (rows, -1) for a
        matrix, (-1,) flat.
      parts: copied in turn.
      gather: set where an inner axis is sliced (``Gather``); ``Part.dst`` then indexes its
        region.
    """

    pos: tuple[int, ...]
    view: tuple[int, ...]
    parts: tuple[Part, ...]
    gather: Gather | None = None


def row_blocks(n_rows: int, row_bytes: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive row ranges of about ``UNIT_BYTES`` each: copy units."""
    step = max(1, UNIT_BYTES // max(1, row_bytes))
    for r0 in range(0, n_rows, step):
        yield r0, min(n_rows, r0 + step)


def shard_units(
    files: CheckpointFiles,
    scales: dict[str, str],
    spec: WeightSpec,
    index: tuple[slice, ...],
    itemsize: int,
) -> list[CopyUnit]:
    """The units that fill a buffer of ``param[index]`` (``itemsize`` bytes an element).

    ``scales``: {FP8 weight name: its scale tensor's name} (``check_tensors``).
    """
    lead = spec.lead
    index = tuple(index) + (slice(None),) * (len(spec.shape) - len(index))
    index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, spec.shape, strict=True))
    whole = tuple(
        slice(None) if (s.start, s.stop) == (0, n) else s
        for s, n in zip(index[lead:], spec.unit_shape, strict=True)
    )
    rows, cols, post = hf_region(spec, whole)
    cols = cols if spec.matrix else None  # a 1-D tensor is read as a flat range
    n_rows = rows.stop - rows.start
    n_cols = cols.stop - cols.start if spec.matrix else 0
    view = (n_rows, -1) if spec.matrix else (-1,)
    gather = None
    if not all(s == slice(None) for s in post):  # an inner axis is sliced
        gather = _gather(spec, n_rows, n_cols, post)
    units: list[CopyUnit] = []
    lead_ranges = [range(index[d].start, index[d].stop) for d in range(lead)]
    for pos, unit in zip(
        itertools.product(*(range(len(r)) for r in lead_ranges)),
        itertools.product(*lead_ranges),
        strict=True,
    ):
        pieces = _pieces(files, scales, spec, spec.unit_name(unit), rows, cols)
        if gather is not None:  # the covering region whole, then sliced
            units.append(CopyUnit(pos, view, tuple(pieces), gather))
        elif spec.matrix and len(pieces) > 1 and spec.tp_dim == 1:
            units += _column_units(pos, view, pieces, n_rows, n_cols * itemsize)
        else:
            for piece in pieces:
                units += _row_units(pos, view, piece, itemsize)
    return units


def _pieces(files, scales, spec: WeightSpec, name: str, rows: slice, cols: slice | None):
    """One ``Part`` per TP slice of released tensor ``name`` that region [rows, cols] touches,
    its ``dst`` in the region's own coordinates."""
    entries = files.entries(name)
    scale_name = scales.get(name)
    n_rows = rows.stop - rows.start
    full = (
        (slice(0, n_rows),)
        if cols is None
        else (slice(0, n_rows), slice(0, cols.stop - cols.start))
    )

    def scale(entry: TensorInfo) -> TensorInfo | None:
        return None if scale_name is None else files.entry(scale_name, entry.rank)

    if len(entries) == 1:
        return [Part(entries[0], rows, cols, full, scale(entries[0]))]
    dim = spec.tp_dim
    region = [rows, cols]
    start, stop = region[dim].start, region[dim].stop
    offset, parts = 0, []
    for entry in entries:
        size = entry.shape[dim]
        lo, hi = max(start, offset), min(stop, offset + size)
        if lo < hi:
            local, into = list(region), list(full)
            local[dim] = slice(lo - offset, hi - offset)
            into[dim] = slice(lo - start, hi - start)
            parts.append(Part(entry, local[0], local[1], tuple(into), scale(entry)))
        offset += size
    return parts


def _row_units(pos, view, piece: Part, itemsize: int) -> list[CopyUnit]:
    """``piece`` cut into blocks of its rows."""
    dst_rows = piece.dst[0]
    row_bytes = itemsize * (piece.dst[1].stop - piece.dst[1].start if len(piece.dst) > 1 else 1)
    units = []
    for r0, r1 in row_blocks(dst_rows.stop - dst_rows.start, row_bytes):
        rows = slice(piece.rows.start + r0, piece.rows.start + r1)
        dst = (slice(dst_rows.start + r0, dst_rows.start + r1), *piece.dst[1:])
        units.append(CopyUnit(pos, view, (dataclasses.replace(piece, rows=rows, dst=dst),)))
    return units


def _column_units(pos, view, pieces: list[Part], n_rows: int, row_bytes: int) -> list[CopyUnit]:
    """Units filling a [R, C] view from TP slices side by side in its columns: each unit a
    block of whole rows, every slice's part of them in turn. One unit per slice wrote a
    fraction of every row across the whole buffer: 2.2 against 3.3 GB/s for row blocks
    (8 slices of [2048, 256] bf16 into fresh memory, two threads, this machine)."""
    units = []
    for r0, r1 in row_blocks(n_rows, row_bytes):
        parts = tuple(
            dataclasses.replace(
                p,
                rows=slice(p.rows.start + r0, p.rows.start + r1),
                dst=(slice(r0, r1), p.dst[1]),
            )
            for p in pieces
        )
        units.append(CopyUnit(pos, view, parts))
    return units


def _gather(spec: WeightSpec, n_rows: int, n_cols: int, post: tuple) -> Gather:
    unit = spec.unit_shape
    k = len(unit) - spec.in_axes if spec.matrix else len(unit)
    region = (n_rows, n_cols) if spec.matrix else (n_rows,)
    shape = (n_rows // max(1, math.prod(unit[1:k])), *unit[1:k])
    if spec.matrix:
        shape += (n_cols // max(1, math.prod(unit[k + 1 :])), *unit[k + 1 :])
    return Gather(region, shape, post)


class Copier:
    """Runs copy units against a checkpoint's files (in the copy threads).

    ``non_finite`` collects the names of the tensors in which ``check_finite`` found a NaN
    or Inf; the pipeline raises once the shard's units are done.
    """

    def __init__(self, files: CheckpointFiles, check_finite: bool):
        self.files = files
        self.check_finite = check_finite
        self.non_finite: list[str] = []

    def run(self, unit: CopyUnit, buffer: np.ndarray) -> None:
        """Runs ``unit`` into ``buffer`` (a shard's host buffer), its span of the buffer
        faulted in first (``fresh.populate``)."""
        dst = buffer[unit.pos]
        if unit.gather is None:
            view = dst.reshape(unit.view)
            populate(_span(view, unit.parts))
            for part in unit.parts:
                self.copy(part, view[part.dst])
            return
        populate(dst)
        region = np.empty(unit.gather.region, dst.dtype)
        for part in unit.parts:
            self.copy(part, region[part.dst])
        dst[...] = region.reshape(unit.gather.shape)[unit.gather.post]

    def copy(self, part: Part, dst: np.ndarray) -> None:
        """``dst[...] = part``'s rectangle (dequantised if FP8), as ``dst``'s dtype, checked.

        The one place bytes leave a file.
        """
        entry = part.entry
        src = self.files.view(entry)
        src = src.reshape(-1)[part.rows] if part.cols is None else src[part.rows, part.cols]
        if entry.dtype in fp8.FP8_DTYPES and dst.dtype != entry.dtype:  # host dequantising
            if self._dequantize_natively(part, src, dst):
                return
            src = fp8.codes_to_float32(src)
            scale = part.scale
            blocks = fp8.is_block_scale(scale.name)
            fp8.scale_on_host(
                src, self.files.view(scale), blocks, part.rows, part.cols, entry.shape[1]
            )
        if src.dtype == dst.dtype and self._copy_natively(entry.name, src, dst):
            return
        if src.dtype == dst.dtype:  # raw bits: a plain memory copy, whatever the float type
            bits = np.dtype(f"u{dst.dtype.itemsize}")
            dst.view(bits)[...] = src.view(bits)
        elif src.dtype == np.float32 and dst.dtype == jnp.bfloat16:
            _to_bfloat16(src, dst)
        else:
            dst[...] = src.astype(dst.dtype)
        # The source too where a cast could hide a NaN (a NaN payload may round to 0).
        if self.check_finite and not (
            all_finite(dst) and (src.dtype == dst.dtype or all_finite(src))
        ):
            self.non_finite.append(entry.name)

    def _copy_natively(self, name: str, src: np.ndarray, dst: np.ndarray) -> bool:
        """``dst[...] = src`` as raw bytes, checked on the way, by the native library
        (``grok.kernels.cpu.host.copy_checked``): one pass where numpy's copy and check
        made two. False where it does not apply (no library, a layout it does not take)."""
        threshold = NON_FINITE_FROM.get(dst.dtype) if self.check_finite else 0
        if threshold is None:
            return False
        bad = host.copy_checked(src, dst, threshold)
        if bad is None:
            return False
        if bad:
            self.non_finite.append(name)
        return True

    def _dequantize_natively(self, part: Part, src: np.ndarray, dst: np.ndarray) -> bool:
        """``dst[...] = `` FP8 ``src`` times its scales by the native library, checked: one
        pass where numpy made four (lookup, scale, rounding, check); 2 copy threads, bf16 out:
        see ``grok.kernels.cpu.host``. False where it does not apply (no library, e5m2 codes,
        a float16 model)."""
        scale = part.scale
        blocks = (FP8_BLOCK, FP8_BLOCK) if fp8.is_block_scale(scale.name) else None
        bad = host.dequantize_fp8(
            src,
            self.files.view(scale),
            dst,
            row0=part.rows.start,
            col0=part.cols.start,
            blocks=blocks,
        )
        if bad is None:
            return False
        if bad and self.check_finite:
            self.non_finite.append(part.entry.name)
        return True


def _span(view: np.ndarray, parts: tuple[Part, ...]) -> np.ndarray:
    """The rows of ``view`` (or elements, flat) the ``parts`` write: a unit's span."""
    return view[min(p.dst[0].start for p in parts) : max(p.dst[0].stop for p in parts)]


def _to_bfloat16(x: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = x.astype(bfloat16)`` (round to nearest even) in integer numpy ops.

    The same bits as ml_dtypes' cast, but these ops release the GIL, so the copy threads
    run in parallel (ml_dtypes' cast holds it: 2 threads, no faster).
    """
    bits = np.ascontiguousarray(x).view(np.uint32)
    t = bits >> 16  # a scratch copy; ``x`` is left as it is
    t &= 1
    t += 0x7FFF
    t += bits
    t >>= 16
    out.view(np.uint16)[...] = t
