"""How many bytes each device will hold, computed from the weight table before loading.

Weights: each parameter's shard on one device (``grok.sharding`` rules), by stored dtype;
with ``quantize="fp8"`` a matrix is one byte per element plus its float32 per-output-channel
scales. KV cache: L layers x (k, v) x B x S x K x H elements, B split over ``data`` and K over
``model`` when the model axis divides K (else the kv heads are replicated, as the weights are).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grok.config import GrokConfig
from grok.errors import MemoryPlanError
from grok.params import weight_specs
from grok.quant import scale_partition, scale_shape
from grok.sharding import (
    DATA,
    MODEL,
    ShardingRules,
    WeightPlacement,
    kv_cache_spec,
    mesh_sizes,
    place_weights,
)

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes on one device (the largest, when shards differ) for weights and the KV cache.

    Attributes:
      weights_by_dtype: {dtype name: bytes} of parameter shards.
      kv_cache: bytes of the KV cache shard for ``batch`` x ``context``.
      mesh: {axis: size}; batch, context: the KV cache request.
    """

    weights_by_dtype: Mapping[str, int]
    kv_cache: int
    mesh: Mapping[str, int]
    batch: int
    context: int

    @property
    def weights(self) -> int:
        return sum(self.weights_by_dtype.values())

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache

    def describe(self, device_bytes: int | None = None) -> str:
        """A human-readable table of the plan (and the headroom on ``device_bytes``)."""
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [f"memory per device (mesh {mesh}):"]
        for name, n in sorted(self.weights_by_dtype.items()):
            lines.append(f"  weights {name:<14} {n / GIB:10.2f} GiB")
        lines.append(f"  weights total          {self.weights / GIB:10.2f} GiB")
        lines.append(
            f"  KV cache B={self.batch} S={self.context:<8} {self.kv_cache / GIB:8.2f} GiB"
        )
        lines.append(f"  total                  {self.total / GIB:10.2f} GiB")
        if device_bytes is not None:
            verdict = "fits" if self.total <= device_bytes else "DOES NOT FIT"
            lines.append(
                f"  device                 {device_bytes / GIB:10.2f} GiB  -> {verdict} "
                f"({(device_bytes - self.total) / GIB:+.2f} GiB headroom)"
            )
        return "\n".join(lines)


def _shard_elements(shape, pspec, sizes: Mapping[str, int]) -> int:
    parts = list(pspec) + [None] * (len(shape) - len(pspec))
    return math.prod(n // (sizes[p] if p else 1) for n, p in zip(shape, parts, strict=True))


def plan_memory(
    config: GrokConfig,
    mesh_sizes: Mapping[str, int],
    *,
    dtype: jnp.dtype = jnp.bfloat16,
    quantize: str | None = None,
    batch: int = 0,
    context: int = 0,
    kv_dtype: jnp.dtype | None = None,
    rules: ShardingRules | None = None,
    placements: Sequence[WeightPlacement] | None = None,
) -> MemoryPlan:
    """Bytes per device for ``config`` on a mesh of ``mesh_sizes`` ({"data": d, "model": m}).

    ``placements``: ``config``'s weights already placed on this mesh with these ``rules``
    (``grok.sharding.place_weights``), as the loader's plan holds them; placed here if None.
    Raises MemoryPlanError for a mesh axis below 1, a negative batch or context, or an unknown
    ``quantize``; ShardingError (as the loader would) if the mesh cannot split a dimension.
    """
    sizes = _check_sizes(mesh_sizes, batch, context)
    if quantize not in (None, "fp8", "fp8-block"):
        raise MemoryPlanError(f"quantize must be None, 'fp8' or 'fp8-block', got {quantize!r}")
    if placements is None:
        placements = place_weights(weight_specs(config), sizes, rules)
    by_dtype: dict[str, int] = {}

    def add(dt, n: int) -> None:
        name = jnp.dtype(dt).name
        by_dtype[name] = by_dtype.get(name, 0) + n * jnp.dtype(dt).itemsize

    for placed in placements:
        spec = placed.spec
        n = _shard_elements(spec.shape, placed.pspec, sizes)
        if quantize is not None and placed.scale_pspec is not None:
            add(jnp.float8_e4m3fn, n)
            s_shape = scale_shape(spec.shape, spec.in_dims, quantize)
            s_pspec = scale_partition(placed.scale_pspec, spec.shape, spec.in_dims, quantize)
            add(jnp.float32, _shard_elements(s_shape, s_pspec, sizes))
        else:
            add(spec.dtype(dtype), n)

    kv = kv_cache_bytes(
        config, sizes, batch=batch, context=context, dtype=kv_dtype or dtype, rules=rules
    )
    return MemoryPlan(by_dtype, kv, dict(sizes), batch, context)


def kv_cache_bytes(
    config: GrokConfig,
    mesh_sizes: Mapping[str, int],
    *,
    batch: int,
    context: int,
    dtype: Any,
    rules: ShardingRules | None = None,
) -> int:
    """Bytes of one device's KV cache shard: k and v, each [L, B, S, K, H] split as the rule
    table splits the cache (``grok.sharding.kv_cache_spec``)."""
    sizes = _check_sizes(mesh_sizes, batch, context)
    shape = (config.num_hidden_layers, batch, context, config.num_key_value_heads, config.head_dim)
    spec = kv_cache_spec(config, sizes, batch, context, rules)
    return 2 * _shard_elements(shape, spec, sizes) * jnp.dtype(dtype).itemsize  # k and v


def _check_sizes(mesh_sizes: Mapping[str, int], batch: int, context: int) -> dict[str, int]:
    """{"data": d, "model": m, ...} with every axis an int >= 1; MemoryPlanError otherwise,
    and for a batch or context that is not an int >= 0."""
    sizes = {DATA: 1, MODEL: 1, **dict(mesh_sizes)}
    for axis, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
            raise MemoryPlanError(f"mesh axis {axis!r} must be an int >= 1, got {size!r}")
    for name, value in (("batch", batch), ("context", context)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise MemoryPlanError(f"KV cache {name} must be an int >= 0, got {value!r}")
    return {axis: int(size) for axis, size in sizes.items()}


def device_bytes_limit(device: jax.Device) -> int | None:
    """The memory one device may use: ``memory_stats()["bytes_limit"]`` where the backend
    reports it; on the CPU backend, whose devices all live in host memory, the host's physical
    memory divided among its local CPU devices; else None (no check)."""
    try:
        stats = device.memory_stats()
    except Exception:  # backends without memory stats raise various errors
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        host = _host_memory_bytes()
        if host is not None:
            return host // max(1, len(jax.local_devices(backend="cpu")))
    return None


def _host_memory_bytes() -> int | None:
    """Physical memory of this machine (``sysconf``), or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        return None


def params_bytes_per_device(params: Any) -> int:
    """The most bytes of ``params`` (a tree of jax arrays) that any one device holds."""
    per_device: dict[Any, int] = {}
    for leaf in jax.tree_util.tree_leaves(params):
        shards = getattr(leaf, "addressable_shards", None)
        if shards is None:  # a host array: count it once
            per_device[None] = per_device.get(None, 0) + int(np.asarray(leaf).nbytes)
            continue
        for shard in shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)


def check_generation_fits(
    config: GrokConfig,
    params: Any,
    mesh: jax.sharding.Mesh | None,
    *,
    batch: int,
    context: int,
    dtype: Any,
) -> None:
    """MemoryPlanError unless the loaded ``params`` plus a KV cache of ``batch`` x ``context``
    (in ``dtype``) fit each device, so a batch too large fails here, not in the backend."""
    sizes = mesh_sizes(mesh)
    weights = params_bytes_per_device(params)
    kv = kv_cache_bytes(config, sizes, batch=batch, context=context, dtype=dtype)
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    limit = device_bytes_limit(device)
    if limit is None or weights + kv <= limit:
        return
    raise MemoryPlanError(
        f"generating {batch} sequence(s) of up to {context} tokens: each device needs "
        f"{(weights + kv) / GIB:.2f} GiB (weights {weights / GIB:.2f} GiB, KV cache "
        f"{kv / GIB:.2f} GiB) but has {limit / GIB:.2f} GiB; use fewer prompts at once, fewer "
        "new tokens, or more devices"
    )


# The share of a device's memory the weights and a server's KV pool fill by default; the rest
# is left to activations, compiled programs and the runtime (vLLM's gpu_memory_utilization
# defaults to the same 0.9).
KV_POOL_MEMORY_FRACTION = 0.9


def kv_pool_tokens(
    config: GrokConfig,
    params: Any,
    mesh: jax.sharding.Mesh | None,
    *,
    dtype: Any,
    most: int,
    fraction: float = KV_POOL_MEMORY_FRACTION,
) -> int:
    """The tokens a server's KV pool holds by default: as many as fit, with the loaded
    ``params``, in ``fraction`` of each device's memory (k and v of every layer per token, in
    ``dtype``, split over the mesh as the cache is), at most ``most``; ``most`` where the
    device's memory is not known, 0 where the weights leave no room."""
    sizes = mesh_sizes(mesh)
    per_token = kv_cache_bytes(config, sizes, batch=1, context=1, dtype=dtype)
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    limit = device_bytes_limit(device)
    if limit is None:
        return most
    room = int(limit * fraction) - params_bytes_per_device(params)
    return max(0, min(most, room // per_token))


def check_fits(plan: MemoryPlan, device_bytes: int | None, what: str) -> None:
    """Raises MemoryPlanError if ``plan.total`` exceeds ``device_bytes`` (None: no check)."""
    if device_bytes is None or plan.total <= device_bytes:
        return
    raise MemoryPlanError(
        f"{what}: each device needs {plan.total / GIB:.2f} GiB "
        f"(weights {plan.weights / GIB:.2f} GiB, KV cache {plan.kv_cache / GIB:.2f} GiB) but has "
        f"{device_bytes / GIB:.2f} GiB; use more model-parallel devices, quantize='fp8', or a "
        f"smaller batch/context.\n{plan.describe(device_bytes)}"
    )
