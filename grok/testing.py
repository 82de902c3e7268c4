"""Test utilities: write tiny checkpoints in the released Grok-2 layout.

``write_checkpoint`` produces what the release looks like on disk (spec section 4): a
``config.json``, whole tensors spread over a few ``pytorch_model-000NN-TP-common.safetensors``
files, and every expert tensor split over ``tp`` files ``pytorch_model-000NN-TP-00R``
(w1/w3 by rows, w2 by columns), PyTorch ``[out, in]`` layout.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from grok.checkpoint import params_to_hf
from grok.config import GrokConfig
from grok.errors import ConfigError
from grok.params import weight_specs
from grok.safetensors_io import save_file


def random_hf_tensors(config: GrokConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under the released names, scaled like a real model's."""
    from grok.model import init_params

    params = init_params(config, seed)
    hf = params_to_hf(config, params)
    rng = np.random.default_rng(seed)
    for name, value in hf.items():
        if name.endswith("norm.weight"):  # ones would hide a transposed or swapped norm
            hf[name] = (1.0 + 0.1 * rng.standard_normal(value.shape)).astype(np.float32)
    return hf


def write_checkpoint(
    path: str | os.PathLike[str],
    config: GrokConfig,
    params_or_seed: int | Mapping[str, Any],
    *,
    tp: int = 8,
    dtype: Any = None,
    common_files: int = 2,
) -> Path:
    """Writes a checkpoint in the released layout and returns its directory.

    Args:
      path: directory to create (or fill).
      config: the model's config, written as ``config.json``.
      params_or_seed: a seed (random weights), our Haiku parameter tree, or a dict of
        released-name tensors (``model.embed_tokens.weight`` ...).
      tp: number of TP files the expert tensors are split over (must divide Fe).
      dtype: stored dtype (e.g. ``jnp.bfloat16``); default keeps the arrays' dtype.
      common_files: how many ``-TP-common`` files the whole tensors are spread over.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(params_or_seed, int):
        tensors = random_hf_tensors(config, params_or_seed)
    elif any(k.startswith(("model.", "lm_head")) for k in params_or_seed):
        tensors = {k: np.asarray(v) for k, v in params_or_seed.items()}
    else:
        tensors = params_to_hf(config, params_or_seed)
    if dtype is not None:
        tensors = {k: np.asarray(v).astype(jnp.dtype(dtype)) for k, v in tensors.items()}
    if config.moe_intermediate_size % tp:
        raise ConfigError(
            f"tp={tp} does not divide moe_intermediate_size ({config.moe_intermediate_size})"
        )

    split_dim = {}
    for spec in weight_specs(config):
        for _, name in spec.hf_names():
            split_dim[name] = spec.tp_dim
    common = sorted(n for n in tensors if split_dim.get(n) is None)
    sharded = sorted(n for n in tensors if split_dim.get(n) is not None)

    number = 1
    chunks = np.array_split(np.array(common, dtype=object), max(1, common_files))
    for chunk in chunks:
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
