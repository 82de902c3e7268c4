"""A checkpoint directory's tensors checked against the weight table, before a byte is read.

Every tensor the table implies is present (all TP ranks of the expert tensors), nothing
unexpected is there (an FP8 scale only beside a known FP8 weight), and every stitched shape,
dtype and scale shape is what the table says. Each failure is a CheckpointError naming the
file and the tensor. The headers themselves were checked when the files were opened
(``grok.checkpoint.files``).
"""

from __future__ import annotations

from collections.abc import Sequence

from grok.checkpoint.files import CheckpointFiles, TensorInfo, tp_file_pattern
from grok.checkpoint.fp8 import FLOAT_DTYPES, FP8_DTYPES, SCALE_SUFFIXES
from grok.errors import CheckpointError
from grok.params import WeightSpec
from grok.quant import FP8_BLOCK


def check_tensors(files: CheckpointFiles, specs: Sequence[WeightSpec]) -> dict[str, str]:
    """Checks ``files`` against ``specs``; returns {FP8 weight name: its scale tensor's name}."""
    expected: dict[str, WeightSpec] = {}
    for spec in specs:
        for _, name in spec.hf_names():
            expected[name] = spec
    present = set(files.names)
    missing = sorted(set(expected) - present)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{files.directory}: missing tensor(s) {', '.join(missing[:5])}{more}; "
            f"the config implies {len(expected)} tensors"
        )
    scales: dict[str, str] = {}
    for name, spec in expected.items():
        scale = _check_tensor(files, name, spec)
        if scale is not None:
            scales[name] = scale
    unexpected = sorted(present - set(expected) - set(scales.values()))
    if unexpected:
        where = files.entries(unexpected[0])[0].file
        base = next(
            (unexpected[0][: -len(s)] for s in SCALE_SUFFIXES if unexpected[0].endswith(s)),
            None,
        )
        why = (
            f"it is not the scale of an FP8 weight ({base!r} is not a float8 tensor of this model)"
            if base is not None
            else "it is not part of the model this config describes"
        )
        raise CheckpointError(
            f"{files.directory}: unexpected tensor {unexpected[0]!r} in {where}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + f"; {why}"
        )
    return scales


def _check_tensor(files: CheckpointFiles, name: str, spec: WeightSpec) -> str | None:
    """Checks one released tensor's dtype and stitched shape; returns its scale's name (FP8)."""
    entries = files.entries(name)
    dtype = entries[0].dtype
    where = ", ".join(sorted({e.file for e in entries}))
    scale = None
    if dtype in FP8_DTYPES:
        scale = _check_fp8(files, name, spec, entries, where)
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
                f"{files.directory}: tensor {name!r} is split over {len(entries)} TP "
                f"files but its {spec.hf_shape[dim]} rows/columns need "
                f"{spec.hf_shape[dim] // per_file}: TP rank {rank} is missing (expected "
                f"a file {tp_file_pattern(files.file_names, rank)})"
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
    return scale


def _check_fp8(files: CheckpointFiles, name: str, spec: WeightSpec, entries, where: str) -> str:
    """One scale tensor per FP8 weight, beside each TP slice, of a shape that fits it."""
    found = [name + s for s in SCALE_SUFFIXES if name + s in files]
    if len(found) != 1:
        raise CheckpointError(
            f"{where}: FP8 tensor {name!r} needs exactly one of {name}_scale or "
            f"{name}_scale_inv, found {len(found)}"
        )
    if not spec.matrix:
        raise CheckpointError(f"{where}: tensor {name!r} is FP8 but is not a matrix")
    scale_name = found[0]
    scales = files.entries(scale_name)
    if len(scales) != 1 and len(scales) != len(entries):
        raise CheckpointError(
            f"{files.directory}: {scale_name!r} is in {len(scales)} TP files, its weight "
            f"in {len(entries)}"
        )
    for entry in entries:
        s = files.entry(scale_name, entry.rank)
        if s.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{s.file}: scale {scale_name!r} has dtype {s.safetensors_dtype}, "
                "expected a float dtype"
            )
        rows, cols = entry.shape
        if scale_name.endswith("_scale_inv"):
            allowed = [(-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))]
        else:
            allowed = [(), (1,), (rows,), (rows, 1)]
        if s.shape not in allowed:
            raise CheckpointError(
                f"{s.file}: {scale_name!r} has shape {list(s.shape)}, which does not "
                f"fit its weight's {list(entry.shape)}; expected one of "
                f"{[list(a) for a in allowed]}"
            )
    return scale_name


def stitched_shape(entries: tuple[TensorInfo, ...], tp_dim: int | None) -> tuple[int, ...]:
    """Shape of a tensor once its TP slices are joined along ``tp_dim``."""
    if len(entries) == 1 and entries[0].rank is None:
        return tuple(entries[0].shape)
    if tp_dim is None:
        raise CheckpointError(
            f"tensor {entries[0].name!r} is split over TP files "
            f"({entries[0].file}, ...) but is not an expert tensor; expected it whole "
            "in a -TP-common file"
        )
    shape = list(entries[0].shape)
    if len(shape) <= tp_dim:
        raise CheckpointError(
            f"{entries[0].file}: TP slice of {entries[0].name!r} has shape {shape}, "
            f"expected a matrix split along dim {tp_dim}"
        )
    shape[tp_dim] = sum(e.shape[tp_dim] for e in entries)
    for e in entries:
        other = [n for d, n in enumerate(e.shape) if d != tp_dim]
        if other != [n for d, n in enumerate(entries[0].shape) if d != tp_dim]:
            raise CheckpointError(
                f"{e.file}: TP slice of {e.name!r} has shape {list(e.shape)}, which does "
                f"not line up with {entries[0].file}'s {list(entries[0].shape)}"
            )
    return tuple(shape)
