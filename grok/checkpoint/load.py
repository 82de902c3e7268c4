"""``load``: a checkpoint directory -> (config, parameters on the device or mesh)."""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp

from grok import memory_plan
from grok.builtin import builtin_dir
from grok.checkpoint.files import CheckpointFiles
from grok.checkpoint.plan import plan_load
from grok.checkpoint.reader import Params, ReleasedCheckpoint
from grok.config import GrokConfig, load_config
from grok.errors import ConfigError
from grok.grok1 import find_ckpt_dir, load_grok1_params
from grok.progress import progress_bar
from grok.sharding import ShardingRules


def load(
    path: str | os.PathLike[str],
    *,
    dtype: Any = jnp.bfloat16,
    mesh: jax.sharding.Mesh | None = None,
    quantize: str | None = None,
    config: GrokConfig | None = None,
    rules: ShardingRules | None = None,
    device_memory_bytes: int | None = None,
    kv_batch: int = 0,
    kv_context: int = 0,
    quiet: bool = False,
    check_finite: bool = True,
) -> tuple[GrokConfig, Params]:
    """Reads a checkpoint onto one device or a mesh: ``(config, params)``.

    See ``grok.load_pretrained`` for the arguments. ``path`` is a directory in the released
    Grok-2 layout, a Grok-1 ``ckpt-0`` (or its parent), or ``"builtin"``. Before a byte of
    weight data is read, in this order: the load is planned (``plan_load``: the mesh checked
    against every dimension, ``ShardingError``; the per-device memory planned), the plan is
    checked against the device's memory (``MemoryPlanError``) and every header is validated
    against the plan's weight table (``CheckpointError``). ``mesh`` may have Explicit or Auto
    axes; the arrays are placed on its Auto-axes twin (``grok.sharding.auto_axes``).
    """
    if os.fspath(path) == "builtin":  # the small model shipped in the package
        path = builtin_dir()
    grok1_dir = find_ckpt_dir(path)  # Grok-1 ckpt-0 pickles (here or in path/ckpt-0)
    if grok1_dir is not None:
        return load_grok1_params(
            grok1_dir,
            config=config,
            dtype=dtype,
            quantize=quantize,
            mesh=mesh,
            check_finite=check_finite,
        )
    if quantize not in (None, "fp8", "fp8-block"):
        raise ConfigError(f"quantize must be None, 'fp8' or 'fp8-block', got {quantize!r}")
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: not a checkpoint directory")
    config = config or load_config(path)
    planned = functools.partial(
        plan_load, config, mesh, dtype=dtype, rules=rules, kv_batch=kv_batch, kv_context=kv_context
    )
    plan = planned(quantize=quantize)
    limit = device_memory_bytes or memory_plan.device_bytes_limit(plan.device)
    memory_plan.check_fits(plan.memory, limit, os.fspath(path))
    desc = f"loading {os.fspath(path)}"
    files = CheckpointFiles(path)  # every header, checked by the safetensors library
    with ReleasedCheckpoint(files, config, specs=plan.specs) as ckpt:
        # An FP8 checkpoint's codes kept as they are where the mode holds their scales
        # (which may make "fp8" "fp8-block"): planned again, with its scales' shapes.
        mode, kept = ckpt.kept_codes(quantize)
        if kept:
            plan = planned(quantize=mode, specs=plan.specs, kept=kept)
            memory_plan.check_fits(plan.memory, limit, os.fspath(path))
        with progress_bar(plan.read_bytes, desc=desc, quiet=quiet) as bar:
            params = ckpt.read(plan, on_bytes=bar.update, check_finite=check_finite)
    return config, params
