"""Writing checkpoints in the released Grok-2 layout.

``write_checkpoint`` produces what the release looks like on disk (spec section 4): a
``config.json``, whole tensors spread over a few ``pytorch_model-000NN-TP-common.safetensors``
files, and every expert tensor split over ``tp`` files ``pytorch_model-000NN-TP-00R``
(w1/w3 by rows, w2 by columns), PyTorch ``[out, in]`` layout. Each file is written by the
``safetensors`` library to a temporary name beside its target, synced, then renamed over it,
so a reader never sees half a file.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike
from safetensors import SafetensorError
from safetensors.numpy import save_file as _library_save_file

from grok.config import GrokConfig
from grok.errors import CheckpointError, ConfigError
from grok.params import hf_to_unit, unit_to_hf, weight_specs


def save_file(
    path: str | os.PathLike[str],
    tensors: Mapping[str, ArrayLike],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` to ``path`` as safetensors (bfloat16 and float8 included), atomically.

    The bytes are the ``safetensors`` library's; they go to a temporary file beside
    ``path``, are synced, then renamed over it.
    """
    path = Path(path)
    arrays = {}
    for name, value in tensors.items():
        array = np.asarray(value)
        arrays[name] = np.ascontiguousarray(array) if array.ndim else array.copy()
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        _library_save_file(arrays, str(temp), metadata=dict(metadata) if metadata else None)
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
    except (SafetensorError, ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path}: cannot write: {err}") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot write: {err.strerror or err}") from None
    finally:
        temp.unlink(missing_ok=True)


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


def write_checkpoint(
    path: str | os.PathLike[str],
    config: GrokConfig,
    params: Mapping[str, Any],
    *,
    tp: int = 8,
    dtype: Any = None,
    common_files: int = 2,
) -> Path:
    """Writes a checkpoint in the released layout and returns its directory.

    Args:
      path: directory to create (or fill).
      config: the model's config, written as ``config.json``.
      params: our Haiku parameter tree, or a dict of released-name tensors
        (``model.embed_tokens.weight`` ...).
      tp: number of TP files the expert tensors are split over (must divide Fe).
      dtype: stored dtype (e.g. ``jnp.bfloat16``); default keeps the arrays' dtype.
      common_files: how many ``-TP-common`` files the whole tensors are spread over.
    """
    if tp < 1 or config.moe_intermediate_size % tp:
        raise ConfigError(
            f"tp={tp} does not divide moe_intermediate_size ({config.moe_intermediate_size})"
        )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if any(k.startswith(("model.", "lm_head")) for k in params):
        tensors = {k: np.asarray(v) for k, v in params.items()}
    else:
        tensors = params_to_hf(config, params)
    if dtype is not None:
        tensors = {k: np.asarray(v).astype(jnp.dtype(dtype)) for k, v in tensors.items()}

    split_dim = {}
    for spec in weight_specs(config):
        for _, name in spec.hf_names():
            split_dim[name] = spec.tp_dim
    common = sorted(n for n in tensors if split_dim.get(n) is None)
    sharded = sorted(n for n in tensors if split_dim.get(n) is not None)

    number = 1
    for chunk in np.array_split(np.array(common, dtype=object), max(1, common_files)):
        if len(chunk):
            save_file(
                out / f"pytorch_model-{number:05d}-TP-common.safetensors",
                {n: tensors[n] for n in chunk},
            )
            number += 1
    for rank in range(tp):
        part = {}
        for name in sharded:
            dim = split_dim[name]
            size = tensors[name].shape[dim] // tp
            index = [slice(None)] * 2
            index[dim] = slice(rank * size, (rank + 1) * size)
            part[name] = np.ascontiguousarray(tensors[name][tuple(index)])
        if part:
            save_file(out / f"pytorch_model-{number:05d}-TP-{rank:03d}.safetensors", part)
            number += 1
    config.save(out / "config.json")
    return out
