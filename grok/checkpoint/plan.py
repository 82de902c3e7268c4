"""The load plan: where every parameter goes and what this process builds, decided once.

``plan_load`` takes the weight table (``grok.params.weight_specs``) once and, before a byte of
a checkpoint is read:

- places every weight on the mesh (``grok.sharding.place_weights``): ShardingError for a
  dimension the mesh cannot split;
- plans each device's memory from those placements (``grok.memory_plan.plan_memory``):
  MemoryPlanError for a bad KV cache request;
- lists, for each parameter (``ParamPlan``), its sharding (and its scale's where ``quantize``
  stores it quantised), the dtype its host buffers are filled with (an FP8 checkpoint's
  codes, where they are kept as they are), and the distinct device shards this process
  builds, of the whole array and of one layer.

Everything after it reads from this plan: the memory check, the header validation (its
``specs``), the progress total, the host buffers' size and the reader's shards.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Collection, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grok.config import GrokConfig
from grok.memory_plan import MemoryPlan, plan_memory
from grok.params import WeightSpec, weight_specs
from grok.quant import QUANT_DTYPES, scale_partition
from grok.sharding import ShardingRules, auto_axes, mesh_sizes, place_weights


@dataclasses.dataclass(frozen=True)
class Shard:
    """One distinct device shard this process builds: its region and the devices holding it.

    ``index`` has one ``slice(start, stop)`` per dim of the array (of the whole parameter,
    so the released tensors' names follow from it even for one layer).
    """

    index: tuple[slice, ...]
    devices: tuple[jax.Device, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.index)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def at_layer(self, layer: int) -> Shard:
        """This shard of layer 0 ([1, ...]) moved to ``layer``."""
        return Shard((slice(layer, layer + 1), *self.index[1:]), self.devices)


def shards_of(shape: tuple[int, ...], sharding: jax.sharding.Sharding) -> tuple[Shard, ...]:
    """The distinct shards of an array ``shape`` on ``sharding`` that this process holds,
    each once (replicas share it), in the order of the sharding's device map."""
    groups: dict[tuple, tuple[tuple[slice, ...], list[jax.Device]]] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = tuple(s.indices(n) for s, n in zip(index, shape, strict=True))
        groups.setdefault(key, (index, []))[1].append(device)
    return tuple(
        Shard(
            tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=True)),
            tuple(devices),
        )
        for index, devices in groups.values()
    )


def shard_read_bytes(shape: tuple[int, ...], sharding: jax.sharding.Sharding, itemsize: int) -> int:
    """Bytes this process builds for an array ``shape`` on ``sharding`` (each distinct shard
    once) at ``itemsize`` bytes an element."""
    return sum(s.size for s in shards_of(shape, sharding)) * itemsize


@dataclasses.dataclass(frozen=True)
class ParamPlan:
    """One parameter as this process builds it.

    Attributes:
      spec: its row of the weight table.
      sharding: the sharding of its array.
      scale_sharding: the sharding of its float32 scale (``grok.quant.scale_shape`` of the
        load's mode) where it is stored quantised (``quantize``), else None.
      dtype: the dtype of its loaded array (before quantising): ``spec.dtype(model dtype)``.
      shards: this process's distinct shards of the whole array.
      kept: quantised by keeping an FP8 checkpoint's codes and scales as they are (their
        bytes copied), not by quantising the weights.
    """

    spec: WeightSpec
    sharding: jax.sharding.Sharding
    scale_sharding: jax.sharding.Sharding | None
    dtype: np.dtype
    shards: tuple[Shard, ...]
    kept: bool = False

    @functools.cached_property
    def layer_shards(self) -> tuple[Shard, ...]:
        """Its distinct shards of one layer [1, ...] (as layer 0), for the builds a layer at a
        time; found the first time one is planned."""
        return shards_of((1, *self.spec.shape[1:]), self.sharding)

    @property
    def quantized(self) -> bool:
        """Stored as float8_e4m3fn codes plus a float32 scale (``quantize``)."""
        return self.scale_sharding is not None

    @property
    def build_dtype(self) -> np.dtype:
        """What the host buffers hold: the codes where they are kept, float32 where it is
        quantised on the device a layer at a time, else its dtype."""
        if self.kept:
            return np.dtype(QUANT_DTYPES["fp8"])
        return np.dtype(np.float32) if self.quantized else self.dtype

    @property
    def read_bytes(self) -> int:
        """Bytes the load produces for it on this process (the progress bar counts these)."""
        return sum(s.size for s in self.shards) * self.build_dtype.itemsize

    @property
    def largest_buffer_bytes(self) -> int:
        """The largest host buffer one of its shards is read into."""
        shards = self.layer_shards if self.quantized and not self.kept else self.shards
        return max(s.size for s in shards) * self.build_dtype.itemsize

    def region(self, layer: int | None) -> tuple[tuple[int, ...], tuple[Shard, ...]]:
        """(shape, this process's shards) of the whole array, or of ``layer`` alone [1, ...]."""
        if layer is None:
            return self.spec.shape, self.shards
        shape = (1, *self.spec.shape[1:])
        return shape, tuple(s.at_layer(layer) for s in self.layer_shards)


@dataclasses.dataclass(frozen=True)
class LoadPlan:
    """Everything a load decides before reading (see the module docstring).

    Attributes:
      config: the model's config.
      dtype: the model dtype (the router stays float32).
      quantize: None or a mode of ``grok.quant.QUANT_MODES`` ("fp8", "fp8-block").
      params: one ``ParamPlan`` per row of the weight table, in its order.
      memory: the per-device memory plan of the loaded weights and the KV cache request.
      device: the first of this process's devices the arrays go to.
    """

    config: GrokConfig
    dtype: np.dtype
    quantize: str | None
    params: tuple[ParamPlan, ...]
    memory: MemoryPlan
    device: jax.Device

    @property
    def specs(self) -> tuple[WeightSpec, ...]:
        return tuple(p.spec for p in self.params)

    @property
    def read_bytes(self) -> int:
        return sum(p.read_bytes for p in self.params)

    @property
    def largest_buffer_bytes(self) -> int:
        return max(p.largest_buffer_bytes for p in self.params)


def plan_load(
    config: GrokConfig,
    mesh: jax.sharding.Mesh | None = None,
    *,
    dtype: Any = jnp.bfloat16,
    quantize: str | None = None,
    rules: ShardingRules | None = None,
    kv_batch: int = 0,
    kv_context: int = 0,
    specs: Sequence[WeightSpec] | None = None,
    kept: Collection[str] = (),
) -> LoadPlan:
    """The plan of loading ``config``'s weights onto ``mesh`` (None: the first device).

    ``mesh`` may have Explicit or Auto axes: the arrays go on its Auto-axes twin
    (``grok.sharding.auto_axes``). ``kv_batch`` x ``kv_context`` is the KV cache the memory
    plan leaves room for (the context capped at ``max_position_embeddings``). ``specs``: the
    weight table when the caller has it already (default ``weight_specs(config)``). ``kept``:
    the parameters (``"module/name"``) whose FP8 codes a ``quantize`` load keeps as they are
    (``grok.checkpoint.fp8.kept_codes``).
    Raises ShardingError, then MemoryPlanError, before anything is read or allocated.
    """
    mesh = auto_axes(mesh) if mesh is not None else None
    sizes = mesh_sizes(mesh)
    placements = place_weights(weight_specs(config) if specs is None else specs, sizes, rules)
    memory = plan_memory(
        config,
        sizes,
        dtype=dtype,
        quantize=quantize,
        batch=kv_batch,
        context=min(kv_context, config.max_position_embeddings),  # S <= P
        rules=rules,
        placements=placements,
    )
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    local = [d for d in devices if d.process_index == jax.process_index()] or devices

    def sharding(pspec) -> jax.sharding.Sharding:
        if mesh is None:
            return jax.sharding.SingleDeviceSharding(devices[0])
        return jax.sharding.NamedSharding(mesh, pspec)

    params = []
    for placed in placements:
        spec, array = placed.spec, sharding(placed.pspec)
        quantized = quantize is not None and placed.scale_pspec is not None
        scale = None
        if quantized:
            entries = scale_partition(placed.scale_pspec, spec.shape, spec.in_dims, quantize)
            scale = sharding(jax.sharding.PartitionSpec(*entries))
        params.append(
            ParamPlan(
                spec=spec,
                sharding=array,
                scale_sharding=scale,
                dtype=np.dtype(spec.dtype(dtype)),
                shards=shards_of(spec.shape, array),
                kept=quantized and f"{spec.module}/{spec.name}" in kept,
            )
        )
    return LoadPlan(config, np.dtype(dtype), quantize, tuple(params), memory, local[0])
