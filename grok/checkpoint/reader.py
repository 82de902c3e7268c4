"""Reading the released Hugging Face layout into the Haiku parameter tree.

Tensors are found by reading every safetensors header (``CheckpointFiles``), never by file
number. Everything is validated before a byte of weight data is read: every tensor the
config implies is present (all TP ranks of the expert tensors), nothing unexpected is there
(an FP8 scale only beside a known FP8 weight), and every stitched shape, dtype and scale
shape is what the weight table says.

Then each parameter is built device shard by device shard. A shard is one host buffer in
the parameter's own layout, which is the release's ``[out, in]`` reshaped (``grok.params``),
so filling it is a copy of file bytes, split into (file, row range) units that a thread
pool runs in parallel (copies out of a memory map release the GIL); the next shard's units
are queued before a finished shard is placed on its device(s) (``HostBuffers``). On the CPU
backend ``device_put`` adopts a page-aligned buffer without a copy, so each shard is read
into new memory that becomes the array; on an accelerator shards are read into one or two
reused host buffers, the next read overlapping the last transfer, so the host holds at most
two device shards beyond the arrays. FP8 weights travel as their 1-byte codes, copied like
any bytes, and are dequantised on the device after placement (``_build_fp8``,
``grok.quant.dequantize``); on the CPU backend, sharded ones needing a layer at a time are
dequantised unit by unit on the way into the buffer instead (``_fp8_on_device`` says why).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import math
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from grok.checkpoint.files import CheckpointFiles, TensorInfo, tp_file_pattern
from grok.config import GrokConfig
from grok.errors import CheckpointError
from grok.params import WeightSpec, hf_region, weight_specs
from grok.quant import (
    FP8_BLOCK,
    QUANT_DTYPES,
    block_scales,
    dequantize,
    quantize,
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
# Bits without the sign from which a value is Inf or NaN (exponent all ones), per dtype.
_NON_FINITE_FROM = {
    np.dtype(dt): ((1 << jnp.finfo(dt).nexp) - 1) << jnp.finfo(dt).nmant
    for dt in (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64, jnp.float8_e5m2)
}
_NON_FINITE_FROM[np.dtype(jnp.float8_e4m3fn)] = 0x7F  # no Inf; NaN is 0x7f / 0xff only
_CHECK_CHUNK = 1 << 18  # elements per step of the finiteness check: stays in L2
_scratch = threading.local()  # each copy worker's scratch for the check
UNIT_BYTES = 8 << 20  # rows per copy unit: about this many bytes, so big tensors split


class ReleasedCheckpoint:
    """A directory in the released layout (spec section 4), validated against a config."""

    def __init__(self, directory: str | os.PathLike[str], config: GrokConfig):
        self.directory = Path(directory)
        self.config = config
        self.files = CheckpointFiles(self.directory)
        self.specs = weight_specs(config)
        self._scales: dict[str, str] = {}  # FP8 weight name -> its scale tensor's name
        self._check_finite, self._non_finite = True, []  # set by load_params; filled by _copy
        self._buffers = HostBuffers(staged=False)  # set by load_params
        self._validate()

    def close(self) -> None:
        self.files.close()

    def __enter__(self) -> ReleasedCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Validation.
    def _validate(self) -> None:
        expected: dict[str, WeightSpec] = {}
        for spec in self.specs:
            for _, name in spec.hf_names():
                expected[name] = spec
        present = set(self.files.names)
        missing = sorted(set(expected) - present)
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CheckpointError(
                f"{self.directory}: missing tensor(s) {', '.join(missing[:5])}{more}; "
                f"the config implies {len(expected)} tensors"
            )
        for name, spec in expected.items():
            self._check_tensor(name, spec)
        unexpected = sorted(present - set(expected) - set(self._scales.values()))
        if unexpected:
            where = self.files.entries(unexpected[0])[0].path.name
            base = next(
                (unexpected[0][: -len(s)] for s in SCALE_SUFFIXES if unexpected[0].endswith(s)),
                None,
            )
            why = (
                f"it is not the scale of an FP8 weight ({base!r} is not a float8 tensor "
                "of this model)"
                if base is not None
                else "it is not part of the model this config describes"
            )
            raise CheckpointError(
                f"{self.directory}: unexpected tensor {unexpected[0]!r} in {where}"
                + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                + f"; {why}"
            )

    def _check_tensor(self, name: str, spec: WeightSpec) -> None:
        entries = self.files.entries(name)
        dtype = entries[0].dtype
        where = ", ".join(sorted({e.path.name for e in entries}))
        if dtype in FP8_DTYPES:
            self._check_fp8(name, spec, entries, where)
        elif dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{where}: tensor {name!r} has dtype {entries[0].safetensors_dtype}, "
                "expected a floating-point dtype (BF16, F16, F32 or FP8 with scales)"
            )
        found = stitched_shape(entries, spec.tp_dim)
        if found != spec.hf_shape and entries[0].rank is not None:
            dim = spec.tp_dim
            per_file = entries[0].shape[dim]
            if spec.hf_shape[dim] == per_file * (len(entries) + 1):  # the last rank is gone
                rank = len(entries)
                raise CheckpointError(
                    f"{self.directory}: tensor {name!r} is split over {len(entries)} TP "
                    f"files but its {spec.hf_shape[dim]} rows/columns need "
                    f"{spec.hf_shape[dim] // per_file}: TP rank {rank} is missing (expected "
                    f"a file {tp_file_pattern(self.files.files, rank)})"
                )
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {list(found)} stitched from "
                f"{len(entries)} TP files, expected {list(spec.hf_shape)}; the config's "
                "moe_intermediate_size/hidden_size contradicts the weights (or TP files are "
                "missing)"
            )
        if found != spec.hf_shape:
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {list(found)}, expected "
                f"{list(spec.hf_shape)} from the config (check hidden_size, heads, head_dim, "
                "intermediate sizes and vocab_size against the weights)"
            )

    def _check_fp8(self, name, spec: WeightSpec, entries, where: str) -> None:
        """One scale tensor per FP8 weight, beside each TP slice, of a shape that fits it."""
        found = [name + s for s in SCALE_SUFFIXES if name + s in self.files]
        if len(found) != 1:
            raise CheckpointError(
                f"{where}: FP8 tensor {name!r} needs exactly one of {name}_scale or "
                f"{name}_scale_inv, found {len(found)}"
            )
        if not spec.matrix:
            raise CheckpointError(f"{where}: tensor {name!r} is FP8 but is not a matrix")
        scale_name = found[0]
        scales = self.files.entries(scale_name)
        if len(scales) != 1 and len(scales) != len(entries):
            raise CheckpointError(
                f"{self.directory}: {scale_name!r} is in {len(scales)} TP files, its weight "
                f"in {len(entries)}"
            )
        for entry in entries:
            s = self.files.entry(scale_name, entry.rank)
            if s.dtype not in FLOAT_DTYPES:
                raise CheckpointError(
                    f"{s.path.name}: scale {scale_name!r} has dtype {s.safetensors_dtype}, "
                    "expected a float dtype"
                )
            rows, cols = entry.shape
            if scale_name.endswith("_scale_inv"):
                allowed = [(-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))]
            else:
                allowed = [(), (1,), (rows,), (rows, 1)]
            if s.shape not in allowed:
                raise CheckpointError(
                    f"{s.path.name}: {scale_name!r} has shape {list(s.shape)}, which does not "
                    f"fit its weight's {list(entry.shape)}; expected one of "
                    f"{[list(a) for a in allowed]}"
                )
        self._scales[name] = scale_name

    # Reading.
    def _pieces(self, name: str, spec: WeightSpec, rows: slice, cols: slice):
        """(entry, local rows, local cols, rows/cols in the region) of each TP slice."""
        entries = self.files.entries(name)
        if len(entries) == 1:
            yield entries[0], rows, cols, slice(None), slice(None)
            return
        dim = spec.tp_dim
        region = [rows, cols]
        start, stop = region[dim].start, region[dim].stop
        offset = 0
        for entry in entries:
            size = entry.shape[dim]
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo < hi:
                local, into = list(region), [slice(None), slice(None)]
                local[dim] = slice(lo - offset, hi - offset)
                into[dim] = slice(lo - start, hi - start)
                yield entry, local[0], local[1], into[0], into[1]
            offset += size

    def _copy(self, entry: TensorInfo, rows: slice, cols: slice | None, dst: np.ndarray) -> None:
        """``dst[...] = tensor[rows, cols]`` (dequantised if FP8), as ``dst``'s dtype."""
        src = self.files.view(entry)
        src = src.reshape(-1)[rows] if cols is None else src[rows, cols]  # flat: not a matrix
        if entry.dtype in FP8_DTYPES and dst.dtype != entry.dtype:  # host dequantising: the
            # 256 codes' float32 values by lookup, then scaled
            src = _FP8_VALUES[entry.dtype].take(src.view(np.uint8))
            self._scale(entry, rows, cols, src)
        if src.dtype == dst.dtype:  # raw bits: a plain memory copy, whatever the float type
            bits = np.dtype(f"u{dst.dtype.itemsize}")
            dst.view(bits)[...] = src.view(bits)
        elif src.dtype == np.float32 and dst.dtype == jnp.bfloat16:
            _to_bfloat16(src, dst)
        else:
            dst[...] = src.astype(dst.dtype)
        # The source too where a cast could hide a NaN (a NaN payload may round to 0).
        if self._check_finite and not (_finite(dst) and (src.dtype == dst.dtype or _finite(src))):
            self._non_finite.append(entry.name)

    def _scale(self, entry: TensorInfo, rows: slice, cols: slice, values: np.ndarray) -> None:
        """Multiplies FP8 ``tensor[rows, cols]``'s float32 ``values`` by their scales."""
        scale_name = self._scales[entry.name]
        s = np.asarray(self.files.view(self.files.entry(scale_name, entry.rank)), np.float32)
        if not scale_name.endswith("_scale_inv"):  # per tensor or per output row
            values *= s.reshape(()) if s.size == 1 else s.reshape(-1)[rows, None]
            return
        # One 128-row band of tiles at a time: a [cols] row of scales broadcast over the band.
        r0, r1 = rows.start, rows.stop
        c0, c1 = cols.indices(entry.shape[1])[:2]
        for band in range(r0 // FP8_BLOCK, -(-r1 // FP8_BLOCK)):
            lo, hi = max(r0, band * FP8_BLOCK), min(r1, (band + 1) * FP8_BLOCK)
            row = block_scales(s, slice(band * FP8_BLOCK, band * FP8_BLOCK + 1), slice(c0, c1))
            values[lo - r0 : hi - r0] *= row

    def shard_units(
        self, spec: WeightSpec, index: tuple[slice, ...], buffer: np.ndarray
    ) -> list[Callable[[], None]]:
        """Copy jobs that fill ``buffer`` with ``param[index]``, each a (file, rows) range."""
        lead = spec.lead
        index = tuple(index) + (slice(None),) * (len(spec.shape) - len(index))
        index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, spec.shape, strict=True))
        whole = tuple(
            slice(None) if (s.start, s.stop) == (0, n) else s
            for s, n in zip(index[lead:], spec.unit_shape, strict=True)
        )
        rows, cols, post = hf_region(spec, whole)
        if not spec.matrix:
            cols = None  # read as a flat range
        direct = all(s == slice(None) for s in post)
        matrix_2d = spec.matrix
        jobs: list[Callable[[], None]] = []
        lead_ranges = [range(index[d].start, index[d].stop) for d in range(lead)]
        for pos, unit in zip(
            itertools.product(*(range(len(r)) for r in lead_ranges)),
            itertools.product(*lead_ranges),
            strict=True,
        ):
            name = spec.unit_name(unit)
            dst = buffer[pos]
            if not direct:  # an inner axis is sliced: read the covering region, then slice
                jobs.append(functools.partial(self._copy_sliced, spec, name, rows, cols, post, dst))
                continue
            n_rows = rows.stop - rows.start
            dst2 = dst.reshape(n_rows, -1) if matrix_2d else dst.reshape(-1)
            pieces = list(self._pieces(name, spec, rows, cols))
            if matrix_2d and len(pieces) > 1 and spec.tp_dim == 1:
                jobs += self._column_units(pieces, dst2)
                continue
            for entry, r, c, r_into, c_into in pieces:
                target = dst2[r_into, c_into] if matrix_2d else dst2[r_into]
                row_bytes = target[0].nbytes if target.ndim > 1 else target.itemsize
                for r0, r1 in _row_blocks(target.shape[0], row_bytes):
                    local = slice(r.start + r0, r.start + r1)
                    jobs.append(functools.partial(self._copy, entry, local, c, target[r0:r1]))
        return jobs

    def _column_units(self, pieces, dst2: np.ndarray) -> list[Callable[[], None]]:
        """Jobs filling ``dst2`` [R, C] from TP slices side by side in its columns: each job a
        block of whole rows, every slice's part of them in turn. One job per slice wrote a
        fraction of every row across the whole buffer: 2.2 against 3.3 GB/s for row blocks
        (8 slices of [2048, 256] bf16 into fresh memory, two threads, this machine)."""
        jobs: list[Callable[[], None]] = []
        for r0, r1 in _row_blocks(dst2.shape[0], dst2[0].nbytes):
            parts = [
                (entry, slice(r.start + r0, r.start + r1), c, dst2[r0:r1, c_into])
                for entry, r, c, _, c_into in pieces
            ]
            jobs.append(functools.partial(self._copy_parts, parts))
        return jobs

    def _copy_parts(self, parts) -> None:
        for entry, rows, cols, dst in parts:
            self._copy(entry, rows, cols, dst)

    def _copy_sliced(self, spec, name, rows, cols, post, dst) -> None:
        k = len(spec.unit_shape) - spec.in_axes if spec.matrix else len(spec.unit_shape)
        n_cols = cols.stop - cols.start if spec.matrix else 0
        region = np.empty(
            (rows.stop - rows.start, n_cols) if spec.matrix else (rows.stop - rows.start,),
            dst.dtype,
        )
        for entry, r, c, r_into, c_into in self._pieces(name, spec, rows, cols):
            self._copy(entry, r, c, region[r_into, c_into] if spec.matrix else region[r_into])
        unit = spec.unit_shape
        first_out = (rows.stop - rows.start) // max(1, math.prod(unit[1:k]))
        shape = (first_out, *unit[1:k])
        if spec.matrix:
            shape += (n_cols // max(1, math.prod(unit[k + 1 :])), *unit[k + 1 :])
        dst[...] = region.reshape(shape)[post]

    def build(
        self,
        spec: WeightSpec,
        sharding: jax.sharding.Sharding,
        dtype: jnp.dtype,
        pool: ThreadPoolExecutor,
        on_bytes: Callable[[int], None] | None = None,
        layer: int | None = None,
    ) -> jax.Array:
        """Parameter ``spec`` as ``dtype`` on ``sharding``; ``layer``: only that layer, [1, ...].

        FP8 weights travel as their 1-byte codes and are dequantised on the device
        (``_build_fp8``) where the scales allow it; otherwise on the host, unit by unit.
        """
        plan = self._fp8_plan(spec)
        if plan is not None and _fp8_on_device(spec, sharding, dtype, layer):
            return self._build_fp8(spec, sharding, dtype, pool, on_bytes, layer, plan)
        return self._build_host(spec, sharding, np.dtype(spec.dtype(dtype)), pool, on_bytes, layer)

    def _fp8_plan(self, spec: WeightSpec):
        """How ``_build_fp8`` dequantises ``spec`` on the device, or None (host path).

        (codes dtype, grid float32 [*lead, R, C], rows int32 [out...], cols int32 [in...]):
        the scale of unit ``u``'s element (out index o, in index i) is
        ``grid[u][rows[o], cols[i]]``, every kind (per tensor, per channel, 128x128 blocks,
        per TP slice) put as one small grid and two index maps. None where the weight is not
        FP8 in every unit, or its units or TP slices lay out their scales differently.
        """
        if not spec.matrix:
            return None
        lead_shape = spec.shape[: spec.lead]
        names = [spec.unit_name(u) for u in itertools.product(*map(range, lead_shape))]
        if not all(n in self._scales for n in names):
            return None
        dtypes = {e.dtype for n in names for e in self.files.entries(n)}
        if len(dtypes) != 1:
            return None
        grids, first = [], None
        for name in names:
            unit = self._scale_grid(name, spec)
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
        return dtypes.pop(), grid, rows, cols

    def _scale_grid(self, name: str, spec: WeightSpec):
        """(grid [R, C], row map [rows], col map [cols]) of ``name``'s stitched scales.

        Each TP slice's scales as a grid with maps from its rows and columns, joined along
        ``spec.tp_dim``; None where the slices' maps along the other dim differ.
        """
        scale_name = self._scales[name]
        parts = []
        for e in self.files.entries(name):
            s = np.asarray(self.files.view(self.files.entry(scale_name, e.rank)), np.float32)
            n_r, n_c = e.shape
            if scale_name.endswith("_scale_inv"):
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

    def _build_fp8(self, spec, sharding, dtype, pool, on_bytes, layer, plan) -> jax.Array:
        """FP8 ``spec`` as ``dtype``: the codes' bytes copied into shard buffers as they are,
        placed with ``sharding``, dequantised there (``grok.quant.dequantize``).

        The whole parameter at once where its codes (1 byte an element, all shards this host
        holds) take no more memory than its largest device shard of the result (one device, or
        replicated): one compile per (shape, sharding, dtype). Else one layer at a time into a
        preallocated result (host memory: one layer of codes besides the result); one compile
        per (layer shape, sharding, dtype), shared by all layers.
        """
        codes_dtype, grid, rows, cols = plan
        if self._check_finite and not np.all(np.isfinite(grid)):
            bad = np.nonzero(~np.isfinite(grid.reshape(math.prod(grid.shape[: spec.lead]), -1)))
            unit = np.unravel_index(bad[0][0], grid.shape[: spec.lead])
            self._non_finite.append(spec.unit_name(tuple(int(i) for i in unit)))
            self._raise_non_finite()
        out_dtype = jnp.dtype(spec.dtype(dtype))
        counted = None if on_bytes is None else (lambda n: on_bytes(n * out_dtype.itemsize))
        if layer is not None or not spec.per_layer or _fp8_whole(spec, sharding, dtype):
            codes = self._build_host(spec, sharding, codes_dtype, pool, counted, layer)
            g = grid if layer is None else grid[layer : layer + 1]
            w = _dequantize_fn(spec.lead, out_dtype, sharding)(codes, g, rows, cols)
            w.block_until_ready()  # the codes freed before the next parameter's are read
            self._buffers.delete(codes)
            return w
        out = _zeros(spec.shape, out_dtype, sharding)
        update = _dequantize_into_fn(spec.lead, out_dtype, sharding)
        try:
            for i in range(spec.shape[0]):
                codes = self._build_host(spec, sharding, codes_dtype, pool, counted, i)
                out = update(out, codes, grid[i : i + 1], rows, cols, i)
                self._buffers.delete(codes)
        except BaseException:
            out.delete()
            raise
        return out

    def _raise_non_finite(self) -> None:
        raise CheckpointError(
            f"{self.directory}: tensor {min(self._non_finite)!r} holds a non-finite "
            "value (NaN or Inf); the weights are damaged (check_finite=False loads "
            "them anyway, quantize refuses them)"
        )

    def _build_host(self, spec, sharding, buffer_dtype, pool, on_bytes, layer) -> jax.Array:
        """``spec`` (``layer``'s [1, ...] only if given) as ``buffer_dtype``, shard by shard.

        Pipelined: the next shard's copy units are queued before the previous shard is
        placed, so the pool never idles at a shard's tail, and (accelerators) a shard's
        transfer overlaps the next one's reads.
        """
        shape = spec.shape if layer is None else (1, *spec.shape[1:])
        groups: dict[tuple, tuple[tuple[slice, ...], list]] = {}
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            key = tuple(s.indices(n) for s, n in zip(index, shape, strict=True))
            groups.setdefault(key, (index, []))[1].append(device)
        buffers = self._buffers
        arrays: list[jax.Array] = []
        pending: collections.deque[_Shard] = collections.deque()
        try:
            for index, devices in groups.values():
                index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=True))
                if layer is not None:
                    index = (slice(layer, layer + 1), *index[1:])
                if len(pending) == buffers.window:
                    arrays += self._place(pending[0], on_bytes)
                    pending.popleft()  # only once placed: a failure cancels its copies too
                buffer, slot = buffers.take(tuple(s.stop - s.start for s in index), buffer_dtype)
                jobs = self.shard_units(spec, index, buffer)
                pending.append(_Shard(buffer, slot, devices, [pool.submit(j) for j in jobs]))
            while pending:
                arrays += self._place(pending[0], on_bytes)
                pending.popleft()
        except BaseException:
            # No copy may still be writing into a buffer that is reused or freed.
            futures = [f for shard in pending for f in shard.futures]
            for future in futures:
                future.cancel()
            concurrent.futures.wait(futures)
            for array in arrays:
                array.delete()
            raise
        return jax.make_array_from_single_device_arrays(shape, sharding, arrays)

    def _place(self, shard: _Shard, on_bytes: Callable[[int], None] | None) -> list[jax.Array]:
        """Waits for ``shard``'s copies, then puts its buffer on its devices."""
        for future in shard.futures:
            future.result()
        if self._non_finite:
            self._raise_non_finite()
        if on_bytes is not None:
            on_bytes(shard.buffer.nbytes)
        return self._buffers.place(shard.buffer, shard.slot, shard.devices)

    def load_params(
        self,
        dtype: jnp.dtype,
        sharding_for: Callable[[WeightSpec], jax.sharding.Sharding] | None = None,
        on_bytes: Callable[[int], None] | None = None,
        quantize: str | None = None,
        check_finite: bool = True,
        scale_sharding_for: Callable[[WeightSpec], jax.sharding.Sharding] | None = None,
        workers: int | None = None,
    ) -> dict[str, dict[str, jax.Array]]:
        """The whole Haiku parameter tree, each array built shard by shard.

        ``sharding_for(spec)`` gives each parameter's sharding (default: the first device),
        ``scale_sharding_for(spec)`` its quantisation scale's (default: the same).
        ``on_bytes(n)`` is called after each shard with the bytes it produced (progress).
        ``quantize="fp8"`` keeps every matrix but the router as float8_e4m3fn ``name`` plus
        float32 ``name_scale`` (one scale per output channel over the whole input dims),
        quantised on the device one layer at a time. ``check_finite`` checks every weight
        as it is read (CheckpointError naming the bad tensor); quantising always checks.
        On any error the arrays built so far are deleted and nothing is returned.
        """
        if quantize not in (None, "fp8"):
            raise CheckpointError(f"quantize must be None or 'fp8', got {quantize!r}")
        device = jax.devices()[0]
        # A scale from a NaN would spoil a whole channel: quantising always checks.
        self._check_finite, self._non_finite = check_finite or quantize is not None, []

        def default(spec: WeightSpec) -> jax.sharding.Sharding:
            return jax.sharding.SingleDeviceSharding(device)

        sharding_for = sharding_for or default
        scale_sharding_for = scale_sharding_for or sharding_for
        self._buffers = self._host_buffers(dtype, sharding_for, quantize)
        params: dict[str, dict[str, jax.Array]] = {}
        workers = workers or os.cpu_count() or 1
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="grok-load") as pool:
                for spec in self.specs:
                    module = params.setdefault(spec.module, {})
                    if quantize is not None and spec.quantized:
                        q, s = self._load_quantized(
                            spec, sharding_for(spec), scale_sharding_for(spec), pool, on_bytes
                        )
                        module[spec.name], module[spec.name + "_scale"] = q, s
                        continue
                    module[spec.name] = self.build(spec, sharding_for(spec), dtype, pool, on_bytes)
        except BaseException:
            for array in jax.tree_util.tree_leaves(params):
                array.delete()
            raise
        finally:
            self._buffers.drain()
            self._buffers = HostBuffers(staged=False)  # the staging memory freed
        return params

    def _host_buffers(self, dtype, sharding_for, quantize) -> HostBuffers:
        """The load's ``HostBuffers``: staged off the CPU backend, with a second slot (reads
        overlapping transfers) only where it fits the memory budget, 5% of the checkpoint."""
        first = sharding_for(self.specs[0])
        if not stages_on_host(next(iter(first.device_set))):
            return HostBuffers(staged=False)
        largest = 0
        for spec in self.specs:
            layered = quantize is not None and spec.quantized  # built a layer at a time
            shape = (1, *spec.shape[1:]) if layered else spec.shape
            item = build_itemsize(spec, dtype, quantize)
            largest = max(largest, math.prod(sharding_for(spec).shard_shape(shape)) * item)
        checkpoint = sum(path.stat().st_size for path in self.files.files)
        return HostBuffers(staged=True, count=2 if largest <= 0.05 * checkpoint else 1)

    def _load_quantized(self, spec, sharding, scale_sharding, pool, on_bytes):
        """(float8 weight, float32 per-output-channel scale), one layer at a time."""
        qs = _zeros(spec.shape, QUANT_DTYPES["fp8"], sharding)
        ss = _zeros(scale_shape(spec.shape, spec.in_dims), jnp.float32, scale_sharding)
        update = _quantize_into_fn(spec.in_dims, sharding, scale_sharding)
        for layer in range(spec.shape[0]):
            w = self.build(spec, sharding, jnp.float32, pool, on_bytes, layer=layer)
            qs, ss = update(qs, ss, w, layer)
            self._buffers.delete(w)
        return qs, ss


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-order array on fresh page-aligned memory, without huge pages.

    Page-aligned (the CPU backend adopts buffers aligned to 64 bytes without a copy). No huge
    pages: with transparent huge pages on, first touching a several-hundred-MB shard made the
    kernel zero and gather 2 MB pages, and a 2 GB one-device load took 4.6-8.1 s instead of
    1.9-2.2 s (this machine, under load).
    """
    nbytes = math.prod(shape) * dtype.itemsize
    memory = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(memory, np.uint8, nbytes).view(dtype).reshape(shape)


def _row_blocks(n_rows: int, row_bytes: int):
    """(start, stop) of consecutive row ranges of about ``UNIT_BYTES`` each: copy units."""
    step = max(1, UNIT_BYTES // max(1, row_bytes))
    for r0 in range(0, n_rows, step):
        yield r0, min(n_rows, r0 + step)


def build_itemsize(spec: WeightSpec, dtype: jnp.dtype, quantize: str | None) -> int:
    """Bytes per element that ``load_params`` builds ``spec`` in: float32 where it is
    quantised on the device (a layer at a time), else ``spec``'s dtype under ``dtype``."""
    if quantize is not None and spec.quantized:
        return 4
    return jnp.dtype(spec.dtype(dtype)).itemsize


def stages_on_host(device: jax.Device) -> bool:
    """Whether shards bound for ``device`` are copied to it out of reused host buffers.

    Everywhere but the CPU backend, which adopts each (page-aligned) shard buffer as the
    device array without a copy: there the buffer is the loaded array and must be new memory.
    """
    return device.platform != "cpu"


@dataclasses.dataclass
class _Shard:
    """One device shard being read: its buffer, ring slot, devices and copy jobs."""

    buffer: np.ndarray
    slot: int | None
    devices: list[jax.Device]
    futures: list[concurrent.futures.Future]


class HostBuffers:
    """Where shards are read on the host before ``device_put``.

    ``staged=False`` (CPU backend): every shard gets fresh page-aligned memory, adopted as
    the device array, so no memory is held beyond the arrays; ``window`` 2 only lets the
    next shard's copies start before this one is placed.

    ``staged=True`` (accelerators): a ring of ``count`` buffers, reused for the whole load,
    so reads run at page-cache copy speed instead of paying fresh memory's page faults, and
    host memory stays at ``count`` x the largest shard. A slot is handed out again only once
    the arrays last placed from it are ready: their transfer has finished reading it. With
    two slots the next shard's reads overlap this shard's transfer. An array placed from a
    slot is deleted through ``delete``, which waits for its transfer first (a deleted array
    can no longer be waited on).
    """

    def __init__(self, staged: bool, count: int = 2):
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.staged = staged
        self.window = count if staged else 2
        self._memory: list[np.ndarray | None] = [None] * count
        self._in_flight: list[list[jax.Array]] = [[] for _ in range(count)]
        self._next = 0

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, int | None]:
        """An uninitialised ``shape`` array to read a shard into, and its ring slot."""
        if not self.staged:
            return aligned_empty(shape, dtype), None
        slot, self._next = self._next, (self._next + 1) % len(self._memory)
        _wait(self._in_flight[slot])  # its last transfer has read it
        self._in_flight[slot] = []
        nbytes = math.prod(shape) * dtype.itemsize
        memory = self._memory[slot]
        if memory is None or memory.nbytes < nbytes:
            self._memory[slot] = None  # the old one freed before the new one is touched
            memory = self._memory[slot] = aligned_empty((nbytes,), np.dtype(np.uint8))
        return memory[:nbytes].view(dtype).reshape(shape), slot

    def place(
        self, buffer: np.ndarray, slot: int | None, devices: list[jax.Device]
    ) -> list[jax.Array]:
        """``buffer`` on each of ``devices``; a staged slot is busy until they are ready."""
        if slot is None:
            return [jax.device_put(buffer, d) for d in devices]
        # may_alias=False: a reused buffer must never be an array's memory. (XLA:CPU aliases
        # a numpy buffer even so, jax-ml/jax#37830: one reason the CPU never stages.) Off the
        # CPU, PJRT reads the host buffer until the transfer completes, hence ``take``'s wait.
        placed = [jax.device_put(buffer, d, may_alias=False) for d in devices]
        self._in_flight[slot] = placed
        return placed

    def delete(self, array: jax.Array) -> None:
        """Deletes ``array`` (built from ``place``'s arrays) once no transfer reads for it."""
        if self.staged:
            array.block_until_ready()
        array.delete()

    def drain(self) -> None:
        """Waits for every transfer still reading a staged buffer."""
        for arrays in self._in_flight:
            _wait(arrays)
        self._in_flight = [[] for _ in self._in_flight]


def _wait(arrays: list[jax.Array]) -> None:
    """Blocks until ``arrays`` are ready; deleted ones were waited for by ``delete`` (or
    deleted on an error, after which no buffer is reused)."""
    jax.block_until_ready([a for a in arrays if not a.is_deleted()])


def _to_bfloat16(x: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = x.astype(bfloat16)`` (round to nearest even) in integer numpy ops.

    The same bits as ml_dtypes' cast, but these ops release the GIL, so the copy workers
    run in parallel (ml_dtypes' cast holds it: 2 threads, no faster).
    """
    bits = np.ascontiguousarray(x).view(np.uint32)
    t = bits >> 16  # a scratch copy; ``x`` is left as it is
    t &= 1
    t += 0x7FFF
    t += bits
    t >>= 16
    out.view(np.uint16)[...] = t


def _finite(x: np.ndarray) -> bool:
    """Whether every element of float (or FP8 code) array ``x`` is finite, from its bits.

    Run by the copy workers on each unit just written, in integer ops (no float casts of
    bfloat16): an element is Inf or NaN exactly when its bits without the sign are at least
    ``_NON_FINITE_FROM`` (exponent all ones; e4m3fn's only NaN code 0x7f). In chunks that
    stay in cache, through a per-thread scratch: whole-unit temporaries, each fresh memory,
    made the check cost a fifth of a bf16 load (0.2 of 0.95 s on the 2 GB benchmark here);
    chunked, the copy with its check went from 3.1-3.3 to 3.7-3.9 GB/s. Checked on the
    host, not on the device after placement: there, a compiled check per parameter shape
    cost 4.5-6.5 s of compiling on the 2 GB benchmark (this machine, under load).
    """
    if x.dtype not in _NON_FINITE_FROM:
        return bool(np.all(np.isfinite(x)))
    bits = x.view(np.dtype(f"u{x.dtype.itemsize}"))
    # Rows, so that a strided unit (TP slices side by side) is not copied flat first.
    rows = bits.reshape(len(bits), -1) if bits.ndim else bits.reshape(1, 1)
    no_sign = np.array((1 << (8 * x.dtype.itemsize - 1)) - 1, bits.dtype)
    step = max(1, _CHECK_CHUNK // max(1, rows.shape[1]))
    scratch = getattr(_scratch, bits.dtype.name, None)
    if scratch is None or scratch.size < step * rows.shape[1]:
        scratch = np.empty(max(_CHECK_CHUNK, step * rows.shape[1]), bits.dtype)
        setattr(_scratch, bits.dtype.name, scratch)
    for start in range(0, len(rows), step):
        part = rows[start : start + step]
        magnitude = np.bitwise_and(part, no_sign, out=scratch[: part.size].reshape(part.shape))
        if magnitude.max(initial=0) >= _NON_FINITE_FROM[x.dtype]:
            return False
    return True


def _fp8_whole(spec: WeightSpec, sharding: jax.sharding.Sharding, dtype: jnp.dtype) -> bool:
    """Whether ``spec``'s codes (all shards this host holds, 1 byte an element) take no more
    memory than its largest device shard of the result: then it is dequantised at once."""
    largest = math.prod(sharding.shard_shape(spec.shape)) * jnp.dtype(spec.dtype(dtype)).itemsize
    return shard_read_bytes(spec.shape, sharding, 1) <= largest


def _fp8_on_device(spec, sharding, dtype, layer) -> bool:
    """Whether FP8 ``spec`` is dequantised on the device rather than on the host.

    Always on an accelerator. On the CPU backend, where "device" work takes the same cores
    as the host's, only where the whole parameter goes at once: one layer at a time (a
    sharded parameter, each shard smaller than all its codes) loaded at 0.50-0.54 GB/s on
    the (1, 8) mesh against 0.80-0.83 GB/s on the host (scripts/bench_load.py, this
    2-core machine), the zeroed result and one extra compile per shape costing more than
    they save.
    """
    if sharding.device_set and next(iter(sharding.device_set)).platform != "cpu":
        return True
    return layer is not None or not spec.per_layer or _fp8_whole(spec, sharding, dtype)


def _scales_of(codes: jax.Array, grid: jax.Array, rows: jax.Array, cols: jax.Array, lead: int):
    """Per-element scales [*codes.shape]: ``grid[unit][rows[o], cols[i]]`` (``_fp8_plan``)."""
    nd = codes.ndim
    index = [
        jnp.arange(codes.shape[j]).reshape([codes.shape[j] if a == j else 1 for a in range(nd)])
        for j in range(lead)
    ]
    index.append(rows.reshape((1,) * lead + rows.shape + (1,) * cols.ndim))
    index.append(cols.reshape((1,) * (lead + rows.ndim) + cols.shape))
    return grid[tuple(index)]


@functools.cache
def _dequantize_fn(lead: int, dtype: jnp.dtype, sharding: jax.sharding.Sharding):
    """A jitted ``(codes, grid, rows, cols) -> codes * scales`` as ``dtype`` on ``sharding``.

    The codes are not donated: their 1-byte buffers cannot hold the wider result (the
    caller deletes them instead).
    """

    def dequant(codes, grid, rows, cols):
        return dequantize(codes, _scales_of(codes, grid, rows, cols, lead), dtype)

    return jax.jit(dequant, out_shardings=sharding)


@functools.cache
def _dequantize_into_fn(lead: int, dtype: jnp.dtype, sharding: jax.sharding.Sharding):
    """A jitted ``(out, codes, grid, rows, cols, layer) -> out`` with layer [1, ...] written."""

    def update(out, codes, grid, rows, cols, layer):
        w = dequantize(codes, _scales_of(codes, grid, rows, cols, lead), dtype)
        return jax.lax.dynamic_update_slice(out, w, (layer,) + (0,) * (out.ndim - 1))

    return jax.jit(update, donate_argnums=0, out_shardings=sharding)


def _zeros(shape, dtype, sharding) -> jax.Array:
    return _zeros_fn(tuple(shape), jnp.dtype(dtype), sharding)()


@functools.cache
def _zeros_fn(shape, dtype, sharding):
    """One compile per (shape, dtype, sharding), shared by the parameters alike."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def _quantize_into_fn(in_dims, sharding, scale_sharding):
    """A jitted ``(qs, ss, w, layer) -> (qs, ss)`` writing layer ``w`` [1, ...] quantised.

    Per output channel (the ``in_dims`` reduced; the compiler gathers their max across
    shards); ``qs``/``ss`` are donated, updated in place, and keep their shardings.
    """

    def update(qs, ss, w, layer):
        q, s = quantize(w, "fp8", in_dims)
        start = (layer,) + (0,) * (qs.ndim - 1)
        return (
            jax.lax.dynamic_update_slice(qs, q, start),
            jax.lax.dynamic_update_slice(ss, s, start),
        )

    return jax.jit(update, donate_argnums=(0, 1), out_shardings=(sharding, scale_sharding))


def shard_read_bytes(shape: tuple[int, ...], sharding: jax.sharding.Sharding, itemsize: int) -> int:
    """Bytes ``build`` produces on this host for ``shape`` (each distinct shard once)."""
    keys = {
        tuple(s.indices(n) for s, n in zip(index, shape, strict=True))
        for index in sharding.addressable_devices_indices_map(shape).values()
    }
    return sum(math.prod(b - a for a, b, _ in key) * itemsize for key in keys)


def stitched_shape(entries: tuple[TensorInfo, ...], tp_dim: int | None) -> tuple[int, ...]:
    """Shape of a tensor once its TP slices are joined along ``tp_dim``."""
    if len(entries) == 1 and entries[0].rank is None:
        return tuple(entries[0].shape)
    if tp_dim is None:
        raise CheckpointError(
            f"tensor {entries[0].name!r} is split over TP files "
            f"({entries[0].path.name}, ...) but is not an expert tensor; expected it whole "
            "in a -TP-common file"
        )
    shape = list(entries[0].shape)
    if len(shape) <= tp_dim:
        raise CheckpointError(
            f"{entries[0].path.name}: TP slice of {entries[0].name!r} has shape {shape}, "
            f"expected a matrix split along dim {tp_dim}"
        )
    shape[tp_dim] = sum(e.shape[tp_dim] for e in entries)
    for e in entries:
        other = [n for d, n in enumerate(e.shape) if d != tp_dim]
        if other != [n for d, n in enumerate(entries[0].shape) if d != tp_dim]:
            raise CheckpointError(
                f"{e.path.name}: TP slice of {e.name!r} has shape {list(e.shape)}, which does "
                f"not line up with {entries[0].path.name}'s {list(entries[0].shape)}"
            )
    return tuple(shape)
