"""How many bytes each device will hold, computed from the weight table before loading.

Weights: each parameter's shard on one device (``grok.sharding`` rules), by stored dtype;
with ``quantize="fp8"`` a matrix is one byte per element plus its float32 per-output-channel
scales. KV cache: L layers x (k, v) x B x S x K x H elements, B split over ``data`` and K over
``model`` when the model axis divides K (else the kv heads are replicated, as the weights are).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from grok.config import GrokConfig
from grok.errors import MemoryPlanError
from grok.params import weight_specs
from grok.quant import scale_shape
from grok.sharding import (
    DATA,
    MODEL,
    ShardingRules,
    kv_cache_spec,
    param_partition_spec,
    scale_partition_spec,
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
) -> MemoryPlan:
    """Bytes per device for ``config`` on a mesh of ``mesh_sizes`` ({"data": d, "model": m}).

    Raises ShardingError (as the loader would) if the mesh cannot split a dimension.
    """
    sizes = {DATA: 1, MODEL: 1, **dict(mesh_sizes)}
    by_dtype: dict[str, int] = {}

    def add(dt, n: int) -> None:
        name = jnp.dtype(dt).name
        by_dtype[name] = by_dtype.get(name, 0) + n * jnp.dtype(dt).itemsize

    for spec in weight_specs(config):
        pspec = param_partition_spec(spec, sizes, rules)
        n = _shard_elements(spec.shape, pspec, sizes)
        if quantize == "fp8" and spec.quantized:
            add(jnp.float8_e4m3fn, n)
            s_shape = scale_shape(spec.shape, spec.in_dims)
            add(
                jnp.float32,
                _shard_elements(s_shape, scale_partition_spec(spec, sizes, rules), sizes),
            )
        else:
            add(spec.dtype(dtype), n)

    kv_dt = jnp.dtype(kv_dtype or dtype)
    kv_shape = (
        config.num_hidden_layers,
        batch,
        context,
        config.num_key_value_heads,
        config.head_dim,
    )
    kv_spec = kv_cache_spec(config, sizes, batch, context, rules)
    kv = 2 * _shard_elements(kv_shape, kv_spec, sizes) * kv_dt.itemsize  # k and v
    return MemoryPlan(by_dtype, int(kv), dict(sizes), batch, context)


def device_bytes_limit(device: jax.Device) -> int | None:
    """The device's ``memory_stats()["bytes_limit"]``, or None where the backend has none (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # backends without memory stats raise various errors
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"])


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
