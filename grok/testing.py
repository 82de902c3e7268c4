"""Test utilities: tiny checkpoints in the released Grok-2 layout.

``write_checkpoint`` is the product's writer (``grok.checkpoint.write_checkpoint``), which
here also takes a seed for random weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from grok.checkpoint import params_to_hf
from grok.checkpoint import write_checkpoint as _write_checkpoint
from grok.config import GrokConfig
from grok.model import init_params


def random_hf_tensors(config: GrokConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under the released names, scaled like a real model's."""
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
    """``grok.checkpoint.write_checkpoint``, or with a seed: random weights of ``config``."""
    if isinstance(params_or_seed, int):
        params_or_seed = random_hf_tensors(config, params_or_seed)
    return _write_checkpoint(
        path, config, params_or_seed, tp=tp, dtype=dtype, common_files=common_files
    )
