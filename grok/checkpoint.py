"""Loading the released Hugging Face layout into the Haiku parameter tree.

Tensors are found by reading every safetensors header (``CheckpointIndex``), never by file
number. Everything is validated before a byte of weight data is read: every tensor the
config implies is present (all TP ranks of the expert tensors), nothing unexpected is there,
and every (stitched) shape and dtype is what the weight table says. Then each parameter is
filled slice by slice through ``read_param_slice``, which reads only the released rows and
columns that the slice needs; the same function serves one device and a device mesh.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from grok.config import GrokConfig
from grok.errors import CheckpointError
from grok.layers import scale_shape
from grok.params import (
    WeightSpec,
    hf_region,
    hf_to_unit,
    region_to_unit,
    unit_to_hf,
    weight_specs,
)
from grok.safetensors_io import E4M3_MAX, FP8_BLOCK, CheckpointIndex, SafetensorsFile, TensorInfo

FLOAT_DTYPES = {
    np.dtype(jnp.bfloat16),
    np.dtype(np.float16),
    np.dtype(np.float32),
    np.dtype(np.float64),
}
FP8_DTYPES = {np.dtype(jnp.float8_e4m3fn), np.dtype(jnp.float8_e5m2)}
SCALE_SUFFIXES = ("_scale", "_scale_inv")
TRANSPOSE_TILE = 64  # elements per side of the tiles a host transpose copies (fits L1)


class ReleasedCheckpoint:
    """A directory in the released layout (spec section 4), validated against a config."""

    def __init__(self, directory: str | os.PathLike[str], config: GrokConfig):
        self.directory = Path(directory)
        self.config = config
        self.index = CheckpointIndex(self.directory)
        self.specs = weight_specs(config)
        self._validate()

    def close(self) -> None:
        self.index.close()

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
        present = set(self.index.names)
        missing = sorted(set(expected) - present)
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CheckpointError(
                f"{self.directory}: missing tensor(s) {', '.join(missing[:5])}{more}; "
                f"the config implies {len(expected)} tensors"
            )
        scales = {n for n in present if n.endswith(SCALE_SUFFIXES)}
        unexpected = sorted(present - set(expected) - scales)
        if unexpected:
            where = self.index.entries(unexpected[0])[0].path.name
            raise CheckpointError(
                f"{self.directory}: unexpected tensor {unexpected[0]!r} in {where}"
                + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                + "; it is not part of the model this config describes"
            )
        for name, spec in expected.items():
            self._check_tensor(name, spec)

    def _check_tensor(self, name: str, spec: WeightSpec) -> None:
        entries = self.index.entries(name)
        dtype = entries[0].dtype
        where = ", ".join(sorted({e.path.name for e in entries}))
        if dtype in FP8_DTYPES:
            if not any(name + s in self.index for s in SCALE_SUFFIXES):
                raise CheckpointError(
                    f"{where}: FP8 tensor {name!r} has no {name}_scale or {name}_scale_inv"
                )
        elif dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{where}: tensor {name!r} has dtype {entries[0].safetensors_dtype}, "
                "expected a floating-point dtype (BF16, F16, F32 or FP8 with scales)"
            )
        found = stitched_shape(entries, spec.tp_dim)
        if found != spec.hf_shape and entries[0].rank is not None:
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {list(found)} stitched from "
                f"{len(entries)} TP files, expected {list(spec.hf_shape)}; a TP rank file "
                f"(ranks above {len(entries) - 1}) may be missing, or the config's "
                "moe_intermediate_size/hidden_size contradicts the weights"
            )
        if found != spec.hf_shape:
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {list(found)}, expected "
                f"{list(spec.hf_shape)} from the config (check hidden_size, heads, head_dim, "
                "intermediate sizes and vocab_size against the weights)"
            )

    # Reading.
    def read_region(self, name: str, spec: WeightSpec, rows: slice, cols: slice | None):
        """Released tensor ``name``[rows, cols] as float32 or its stored float dtype.

        Stitches TP slices: only the ranks that overlap the region are read.
        """
        entries = self.index.entries(name)
        if len(entries) == 1:
            return self._read_entry(entries[0], rows, cols)
        dim = spec.tp_dim
        full = stitched_shape(entries, dim)
        region = [rows, cols if cols is not None else slice(None)]
        start, stop, _ = region[dim].indices(full[dim])
        parts, offset = [], 0
        for entry in entries:
            size = entry.shape[dim]
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo < hi:
                local = list(region)
                local[dim] = slice(lo - offset, hi - offset)
                parts.append(self._read_entry(entry, local[0], local[1]))
            offset += size
        return np.concatenate(parts, axis=dim)

    def _read_entry(self, entry: TensorInfo, rows: slice, cols: slice | None) -> np.ndarray:
        index = (rows,) if cols is None else (rows, cols)
        name = entry.name
        file = self.index.open(entry.path)
        if entry.dtype not in FP8_DTYPES:
            return file.get_slice(name, index)
        return self._read_fp8(entry, file, rows, cols)

    def _read_fp8(
        self, entry: TensorInfo, file: SafetensorsFile, rows: slice, cols: slice | None
    ) -> np.ndarray:
        """Dequantised ``q[rows, cols]`` of one FP8 entry, reading only that region.

        The scale comes from the same file rank as the weight (a TP slice carries its own
        scales): ``_scale`` per tensor or per output row, ``_scale_inv`` per 128x128 block
        of this slice.
        """
        name = entry.name
        where = f"{entry.path.name}: {name}"
        index = (rows,) if cols is None else (rows, cols)
        found = [s for s in SCALE_SUFFIXES if name + s in self.index]
        if len(found) != 1:
            raise CheckpointError(
                f"{where}: FP8 tensor needs exactly one of {name}_scale / {name}_scale_inv, "
                f"found {len(found)}"
            )
        scale_name = name + found[0]
        scale_rank = entry.rank if self.index.is_sharded(scale_name) else None
        scale = self.index.get(scale_name, scale_rank)  # memmap view, small
        q = file.get_slice(name, index).astype(np.float32)  # [r, c] region only
        n_rows = entry.shape[0]
        r0, r1, _ = rows.indices(n_rows)
        if found[0] == "_scale":
            s = np.asarray(scale, np.float32)
            if s.size == 1:
                return q * s.reshape(())
            if s.size != n_rows:
                raise CheckpointError(
                    f"{where}: _scale of shape {list(s.shape)} does not fit the weight's "
                    f"shape {list(entry.shape)}; expected [] or [{n_rows}] or [{n_rows}, 1]"
                )
            per_row = s.reshape(n_rows)[r0:r1]
            return q * per_row.reshape(-1, *([1] * (q.ndim - 1)))
        if len(entry.shape) != 2:
            raise CheckpointError(f"{where}: block scales need a 2-D weight, found {entry.shape}")
        n_cols = entry.shape[1]
        expected = (-(-n_rows // FP8_BLOCK), -(-n_cols // FP8_BLOCK))
        if tuple(scale.shape) != expected:
            raise CheckpointError(
                f"{where}: _scale_inv of shape {list(scale.shape)} does not fit the weight's "
                f"shape {list(entry.shape)} in {FP8_BLOCK}x{FP8_BLOCK} blocks; expected "
                f"{list(expected)}"
            )
        c0, c1, _ = (cols or slice(None)).indices(n_cols)
        s = np.asarray(scale, np.float32)
        row_block = np.arange(r0, r1) // FP8_BLOCK  # [r]
        col_block = np.arange(c0, c1) // FP8_BLOCK  # [c]
        return q * s[row_block[:, None], col_block[None, :]]

    def read_param_slice(
        self, spec: WeightSpec, index: tuple[slice, ...], dtype: jnp.dtype
    ) -> np.ndarray:
        """``param[index]`` for the stacked parameter ``spec``, read from the released files."""
        index = tuple(index) + (slice(None),) * (len(spec.shape) - len(index))
        lead = int(spec.per_layer) + int(spec.per_expert)
        lead_ranges = [range(*index[d].indices(spec.shape[d])) for d in range(lead)]
        unit_index = index[lead:]
        out_shape = tuple(len(r) for r in lead_ranges) + tuple(
            len(range(*s.indices(n))) for s, n in zip(unit_index, spec.unit_shape, strict=True)
        )
        out = np.empty(out_shape, np.dtype(spec.dtype(dtype)))
        rows, cols = hf_region(spec, unit_index)
        direct = spec.transpose and _only_first_axes_sliced(spec, unit_index)
        for pos, unit in _product(lead_ranges):
            kwargs = dict(zip(("i", "e") if spec.per_layer else ("e",), unit, strict=False))
            name = spec.hf_name.format(**kwargs)
            block = self.read_region(name, spec, rows, cols).astype(out.dtype, copy=False)
            if direct:  # [out, in] block -> out[pos] viewed as [in, out], tile by tile
                _transpose_into(out[pos].reshape(block.shape[::-1]), block)
            else:
                _assign(out, pos, region_to_unit(spec, block, unit_index))
        return out

    def load_params(
        self,
        dtype: jnp.dtype,
        sharding_for: Callable[[WeightSpec], jax.sharding.Sharding] | None = None,
        on_bytes: Callable[[int], None] | None = None,
        quantize: str | None = None,
    ) -> dict[str, dict[str, jax.Array]]:
        """The whole Haiku parameter tree, each array built shard by shard.

        ``sharding_for(spec)`` gives each parameter's sharding (default: the first device).
        Only this process's devices are filled, each distinct shard is read once and put on
        every local device that holds it, so host memory peaks near one device shard.
        ``on_bytes(n)`` is called after each shard with the bytes it produced (progress).
        ``quantize="fp8"`` keeps every matrix (attention, dense MLP, experts) as float8_e4m3fn
        ``name`` plus float32 ``name_scale`` (one scale per output channel, over the full
        input dim, see ``quant_in_dims``); router, norms, embedding and head stay in ``dtype``.
        On any error the arrays built so far are deleted and nothing is returned.
        """
        if quantize not in (None, "fp8"):
            raise CheckpointError(f"quantize must be None or 'fp8', got {quantize!r}")
        params: dict[str, dict[str, jax.Array]] = {}
        device = jax.devices()[0]
        try:
            for spec in self.specs:
                sharding = (
                    sharding_for(spec)
                    if sharding_for
                    else jax.sharding.SingleDeviceSharding(device)
                )
                module = params.setdefault(spec.module, {})
                if quantize is not None and is_quantized(spec):
                    q, scale = self._load_fp8(spec, sharding, on_bytes)
                    module[spec.name], module[spec.name + "_scale"] = q, scale
                else:
                    module[spec.name] = build_array(
                        spec.shape,
                        sharding,
                        lambda index, spec=spec: self.read_param_slice(spec, index, dtype),
                        on_bytes,
                    )
        except BaseException:
            for array in jax.tree_util.tree_leaves(params):
                array.delete()
            raise
        return params

    def _load_fp8(self, spec: WeightSpec, sharding: jax.sharding.Sharding, on_bytes):
        """(float8 weight, float32 per-output-channel scale), both with ``sharding``'s layout."""
        in_dims = quant_in_dims(spec)
        scales: dict[tuple, np.ndarray] = {}  # full-input-dim scales by output range

        def scale_key(index: tuple[slice, ...]) -> tuple:
            full = tuple(
                slice(None) if d in in_dims else s
                for d, s in enumerate(_pad_index(index, len(spec.shape)))
            )
            return full, _index_key(full, spec.shape)

        def channel_scale(index: tuple[slice, ...]) -> np.ndarray:
            full, key = scale_key(index)
            if key not in scales:
                scales[key] = self._channel_scale(spec, full, in_dims)
            return scales[key]

        def read_q(index):
            index = _pad_index(index, len(spec.shape))
            w = self.read_param_slice(spec, index, jnp.float32)
            full, key = scale_key(index)
            if key not in scales and _index_key(index, spec.shape) == key:
                # This shard holds whole input rows: its own amax is the full-row amax.
                amax = np.max(np.abs(w), axis=in_dims, keepdims=True)
                scales[key] = _amax_to_scale(amax, spec.hf_name)
            q = np.clip(w / channel_scale(index), -E4M3_MAX, E4M3_MAX)
            return q.astype(jnp.float8_e4m3fn)

        q = build_array(spec.shape, sharding, read_q, on_bytes)
        mesh = getattr(sharding, "mesh", None)
        shape = scale_shape(spec.shape, in_dims)
        if mesh is None:
            scale_sharding = sharding
        else:
            from grok.sharding import scale_partition_spec

            pspec = scale_partition_spec(sharding.spec, len(spec.shape), in_dims)
            scale_sharding = jax.sharding.NamedSharding(mesh, pspec)
        scale = build_array(shape, scale_sharding, channel_scale, None)
        return q, scale

    def _channel_scale(
        self, spec: WeightSpec, index: tuple[slice, ...], in_dims: tuple[int, ...]
    ) -> np.ndarray:
        """amax / 448 over the whole input dims for the output range ``index``.

        Reads one layer (and expert) at a time, so host memory stays near one unit.
        """
        lead = int(spec.per_layer) + int(spec.per_expert)
        lead_ranges = [range(*index[d].indices(spec.shape[d])) for d in range(lead)]
        out_shape = [len(r) for r in lead_ranges] + [
            1 if d in in_dims else len(range(*index[d].indices(spec.shape[d])))
            for d in range(lead, len(spec.shape))
        ]
        amax = np.empty(out_shape, np.float32)
        for pos, unit in _product(lead_ranges):
            sub = tuple(slice(u, u + 1) for u in unit) + tuple(index[lead:])
            block = self.read_param_slice(spec, sub, jnp.float32)
            amax[pos] = np.max(np.abs(block), axis=in_dims, keepdims=True)[(0,) * lead]
        return _amax_to_scale(amax, spec.hf_name)


def _amax_to_scale(amax: np.ndarray, name: str) -> np.ndarray:
    """Per-channel e4m3 scale: amax / 448 (largest value -> 448); an all-zero channel gets 1."""
    if not np.all(np.isfinite(amax)):
        raise CheckpointError(f"{name}: holds a non-finite value; cannot quantise to fp8")
    return np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1)).astype(np.float32)


def is_quantized(spec: WeightSpec) -> bool:
    """Whether ``quantize="fp8"`` stores ``spec`` in float8: every matrix but the router.

    The transposed ``[out, in]`` weights are exactly the attention, dense MLP and expert
    matrices and the router; norms, the embedding and the head are not transposed.
    """
    return spec.transpose and not spec.float32


def quant_in_dims(spec: WeightSpec) -> tuple[int, ...]:
    """The input (contracted) dims of a stacked matrix parameter: after the layer/expert axes."""
    lead = int(spec.per_layer) + int(spec.per_expert)
    return tuple(range(lead, lead + spec.in_axes))


def _assign(out: np.ndarray, pos: tuple[int, ...], value: np.ndarray) -> None:
    """``out[pos] = value`` for arrays of one dtype, copying raw bits.

    ``value`` is usually a transposed view; numpy copies ml_dtypes' bfloat16/float8 element by
    element through the dtype's Python-level hooks, but an unsigned-integer view of the same
    bits copies at memory speed.
    """
    bits = np.dtype(f"u{out.dtype.itemsize}")
    out.view(bits)[pos] = value.view(bits)


def _only_first_axes_sliced(spec: WeightSpec, unit_index: tuple[slice, ...]) -> bool:
    """Whether only the first in-axis and the first out-axis of a unit are sliced.

    Then the released block's transpose is the unit slice itself, with no further slicing.
    """
    unit, k = spec.unit_shape, spec.in_axes
    return all(
        unit_index[d].indices(unit[d]) == (0, unit[d], 1)
        for d in range(len(unit))
        if d not in (0, k)
    )


def _transpose_into(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src.T`` for 2-D arrays, in cache-sized tiles of raw bits.

    A plain strided transpose misses the cache on every element (about 3x slower here).
    """
    bits = np.dtype(f"u{src.dtype.itemsize}")
    d, s = dst.view(bits), src.view(bits)
    rows, cols = s.shape
    for i in range(0, rows, TRANSPOSE_TILE):
        for j in range(0, cols, TRANSPOSE_TILE):
            d[j : j + TRANSPOSE_TILE, i : i + TRANSPOSE_TILE] = s[
                i : i + TRANSPOSE_TILE, j : j + TRANSPOSE_TILE
            ].T


def _pad_index(index: tuple[slice, ...], ndim: int) -> tuple[slice, ...]:
    return tuple(index) + (slice(None),) * (ndim - len(index))


def _index_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple:
    return tuple(s.indices(n) for s, n in zip(_pad_index(index, len(shape)), shape, strict=True))


def build_array(
    shape: tuple[int, ...],
    sharding: jax.sharding.Sharding,
    read: Callable[[tuple[slice, ...]], np.ndarray],
    on_bytes: Callable[[int], None] | None = None,
) -> jax.Array:
    """A global array from ``read(index)``, like ``jax.make_array_from_callback``.

    Only this process's devices are asked for (multi-host: each host reads its own shards);
    an index held by several local devices (replicas over ``data``) is read once.
    """
    groups: dict[tuple, tuple[tuple[slice, ...], list]] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = _index_key(index, shape)
        groups.setdefault(key, (index, []))[1].append(device)
    arrays = []
    for index, devices in groups.values():
        block = read(index)
        if on_bytes is not None:
            on_bytes(block.nbytes)
        arrays += [jax.device_put(block, d) for d in devices]
        del block
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def shard_read_bytes(shape: tuple[int, ...], sharding: jax.sharding.Sharding, itemsize: int) -> int:
    """Bytes ``build_array`` produces on this host for ``shape`` (each distinct shard once)."""
    keys = {
        _index_key(index, shape)
        for index in sharding.addressable_devices_indices_map(shape).values()
    }
    return sum(math.prod(b - a for a, b, _ in key) * itemsize for key in keys)


def stitched_shape(entries: tuple[TensorInfo, ...], tp_dim: int | None) -> tuple[int, ...]:
    """Shape of a tensor once its TP slices are joined along ``tp_dim``."""
    if len(entries) == 1:
        return tuple(entries[0].shape)
    if tp_dim is None:
        raise CheckpointError(
            f"tensor {entries[0].name!r} is split over TP files "
            f"({entries[0].path.name}, ...) but is not an expert tensor; expected it whole "
            "in a -TP-common file"
        )
    shape = list(entries[0].shape)
    shape[tp_dim] = sum(e.shape[tp_dim] for e in entries)
    for e in entries:
        other = [n for d, n in enumerate(e.shape) if d != tp_dim]
        if other != [n for d, n in enumerate(entries[0].shape) if d != tp_dim]:
            raise CheckpointError(
                f"{e.path.name}: TP slice of {e.name!r} has shape {list(e.shape)}, which does "
                f"not line up with {entries[0].path.name}'s {list(entries[0].shape)}"
            )
    return tuple(shape)


def _product(ranges: list[range]):
    """(output position, unit index) over the cartesian product of the leading ranges."""
    if not ranges:
        yield (), ()
        return
    head, *rest = ranges
    for p, value in enumerate(head):
        for pos, unit in _product(rest):
            yield (p, *pos), (value, *unit)


def params_to_hf(config: GrokConfig, params: Mapping[str, Mapping[str, object]]):
    """Our parameter tree as released-name tensors ``{name: [out, in] array}`` (TP stitched)."""
    out: dict[str, np.ndarray] = {}
    for spec in weight_specs(config):
        array = np.asarray(params[spec.module][spec.name])
        for unit, name in spec.hf_names():
            out[name] = np.ascontiguousarray(unit_to_hf(spec, array[unit]))
    return out


def hf_to_params(config: GrokConfig, tensors: Mapping[str, np.ndarray], dtype=jnp.float32):
    """Released-name tensors (TP stitched) as our parameter tree of numpy arrays."""
    params: dict[str, dict[str, np.ndarray]] = {}
    for spec in weight_specs(config):
        array = np.empty(spec.shape, np.dtype(spec.dtype(dtype)))
        for unit, name in spec.hf_names():
            if name not in tensors:
                raise CheckpointError(f"missing tensor {name!r}")
            hf = np.asarray(tensors[name])
            if hf.shape != spec.hf_shape:
                raise CheckpointError(
                    f"tensor {name!r} has shape {list(hf.shape)}, expected {list(spec.hf_shape)}"
                )
            array[unit] = hf_to_unit(spec, hf)
        params.setdefault(spec.module, {})[spec.name] = array
    return params
