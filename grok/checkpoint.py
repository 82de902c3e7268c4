"""Loading the released Hugging Face layout into the Haiku parameter tree.

Tensors are found by reading every safetensors header (``CheckpointIndex``), never by file
number. Everything is validated before a byte of weight data is read: every tensor the
config implies is present (all TP ranks of the expert tensors), nothing unexpected is there,
and every (stitched) shape and dtype is what the weight table says. Then each parameter is
filled slice by slice through ``read_param_slice``, which reads only the released rows and
columns that the slice needs; the same function serves one device and a device mesh.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from grok.config import GrokConfig
from grok.errors import CheckpointError
from grok.params import WeightSpec, hf_region, region_to_unit, weight_specs
from grok.safetensors_io import CheckpointIndex, TensorInfo, dequantize_fp8

FLOAT_DTYPES = {
    np.dtype(jnp.bfloat16),
    np.dtype(np.float16),
    np.dtype(np.float32),
    np.dtype(np.float64),
}
FP8_DTYPES = {np.dtype(jnp.float8_e4m3fn), np.dtype(jnp.float8_e5m2)}
SCALE_SUFFIXES = ("_scale", "_scale_inv")


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

    def _read_fp8(self, entry: TensorInfo, file, rows: slice, cols: slice | None) -> np.ndarray:
        name = entry.name
        q = file.get(name)  # [out, in] memmap
        for suffix in SCALE_SUFFIXES:
            scale_name = name + suffix
            if scale_name not in self.index:
                continue
            scale_entries = self.index.entries(scale_name)
            rank_entry = scale_entries[entry.rank] if entry.rank is not None else scale_entries[0]
            scale = self.index.open(rank_entry.path).get(scale_name)
            kind = "scale" if suffix == "_scale" else "scale_inv"
            full = dequantize_fp8(q, scale, kind=kind, name=f"{entry.path.name}: {name}")
            return full[(rows,) if cols is None else (rows, cols)]
        raise CheckpointError(f"{entry.path.name}: FP8 tensor {name!r} has no scale")

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
        for pos, unit in _product(lead_ranges):
            kwargs = dict(zip(("i", "e") if spec.per_layer else ("e",), unit, strict=False))
            name = spec.hf_name.format(**kwargs)
            block = self.read_region(name, spec, rows, cols)
            out[pos] = region_to_unit(spec, block, unit_index)
        return out

    def load_params(
        self,
        dtype: jnp.dtype,
        sharding_for: Callable[[WeightSpec], jax.sharding.Sharding] | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> dict[str, dict[str, jax.Array]]:
        """The whole Haiku parameter tree, each array built shard by shard.

        ``sharding_for(spec)`` gives each parameter's sharding (default: the first device).
        ``on_bytes(n)`` is called after each shard with the bytes it produced (progress).
        """
        params: dict[str, dict[str, jax.Array]] = {}
        device = jax.devices()[0]
        for spec in self.specs:
            sharding = (
                sharding_for(spec) if sharding_for else jax.sharding.SingleDeviceSharding(device)
            )

            def fill(index, spec=spec):
                block = self.read_param_slice(spec, index, dtype)
                if on_bytes is not None:
                    on_bytes(block.nbytes)
                return block

            array = jax.make_array_from_callback(spec.shape, sharding, fill)
            params.setdefault(spec.module, {})[spec.name] = array
        return params


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
    from grok.params import unit_to_hf

    out: dict[str, np.ndarray] = {}
    for spec in weight_specs(config):
        array = np.asarray(params[spec.module][spec.name])
        for unit, name in spec.hf_names():
            out[name] = np.ascontiguousarray(unit_to_hf(spec, array[unit]))
    return out


def hf_to_params(config: GrokConfig, tensors: Mapping[str, np.ndarray], dtype=jnp.float32):
    """Released-name tensors (TP stitched) as our parameter tree of numpy arrays."""
    from grok.params import hf_to_unit

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
