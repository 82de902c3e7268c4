"""``load``: a checkpoint directory -> (config, parameters on the device or mesh)."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from grok import memory_plan
from grok.builtin import builtin_dir
from grok.checkpoint.reader import ReleasedCheckpoint, build_itemsize, shard_read_bytes
from grok.config import GrokConfig, load_config
from grok.errors import ConfigError
from grok.grok1 import is_grok1_checkpoint, load_grok1_params
from grok.memory_plan import check_fits, plan_memory
from grok.progress import progress_bar
from grok.sharding import (
    ShardingRules,
    auto_axes,
    check_divisible,
    mesh_sizes,
    scale_partition_spec,
    sharding_fn,
)

Params = dict[str, dict[str, jax.Array]]


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
    weight data is read: the mesh is checked against every dimension (``ShardingError``),
    the per-device memory is planned and checked (``MemoryPlanError``) and every header is
    validated (``CheckpointError``). ``mesh`` may have Explicit or Auto axes; the arrays
    are placed on its Auto-axes twin (``grok.sharding.auto_axes``).
    """
    if os.fspath(path) == "builtin":  # the small model shipped in the package
        path = builtin_dir()
    mesh = auto_axes(mesh) if mesh is not None else None
    if is_grok1_checkpoint(path):  # Grok-1 ckpt-0 pickles (or their parent)
        return load_grok1_params(
            path,
            config=config,
            dtype=dtype,
            quantize=quantize,
            mesh=mesh,
            check_finite=check_finite,
        )
    if quantize not in (None, "fp8"):
        raise ConfigError(f"quantize must be None or 'fp8', got {quantize!r}")
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: not a checkpoint directory")
    config = config or load_config(path)
    rules = rules or ShardingRules()
    sizes = mesh_sizes(mesh)
    check_divisible(config, sizes, rules)
    plan = plan_memory(
        config,
        sizes,
        dtype=dtype,
        quantize=quantize,
        batch=kv_batch,
        context=min(kv_context, config.max_position_embeddings),  # S <= P
        rules=rules,
    )
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    local = [d for d in devices if d.process_index == jax.process_index()] or devices
    limit = device_memory_bytes or memory_plan.device_bytes_limit(local[0])
    check_fits(plan, limit, str(path))
    single = jax.sharding.SingleDeviceSharding(devices[0])
    if mesh is not None:
        sharding_for = sharding_fn(mesh, rules)

        def scale_sharding_for(spec):
            return jax.sharding.NamedSharding(mesh, scale_partition_spec(spec, sizes, rules))
    else:

        def sharding_for(spec):
            return single

        scale_sharding_for = sharding_for
    with ReleasedCheckpoint(path, config) as ckpt:
        total = 0
        for spec in ckpt.specs:
            item = build_itemsize(spec, jnp.dtype(dtype), quantize)
            total += shard_read_bytes(spec.shape, sharding_for(spec), item)
        with progress_bar(total, desc=f"loading {os.fspath(path)}", quiet=quiet) as bar:
            params = ckpt.load_params(
                jnp.dtype(dtype),
                sharding_for,
                bar.update,
                quantize,
                check_finite=check_finite,
                scale_sharding_for=scale_sharding_for,
            )
    return config, params
