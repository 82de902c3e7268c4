"""Grok-1 ``ckpt-0`` loading, kept importable here; the code lives in ``grok.checkpoint.grok1``.

``load_grok1`` returns a ``grok.Model``; ``grok.load_pretrained`` routes ``ckpt-0`` folders
to the same reader.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from grok.api import Model
from grok.checkpoint.grok1 import (
    QUANTIZE_MODES,
    find_ckpt_dir,
    grok1_config_for,
    is_grok1_checkpoint,
    load_grok1_params,
    read_grok1_params,
    requantize_per_channel,
)
from grok.config import GrokConfig

__all__ = [
    "QUANTIZE_MODES",
    "find_ckpt_dir",
    "grok1_config_for",
    "is_grok1_checkpoint",
    "load_grok1",
    "read_grok1_params",
    "requantize_per_channel",
]


def load_grok1(
    path: str | os.PathLike[str],
    *,
    config: GrokConfig | None = None,
    dtype: Any = jnp.bfloat16,
    quantize: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> Model:
    """A ``grok.Model`` from a Grok-1 ``ckpt-0`` folder; see ``load_grok1_params``."""
    config, params = load_grok1_params(
        path, config=config, dtype=dtype, quantize=quantize, mesh=mesh
    )
    return Model(config, params, dtype=dtype, quant=quantize)
