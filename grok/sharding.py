"""Placing the model on a device mesh: one table from logical axes to mesh axes.

The mesh has two named axes: ``data`` (batch, B) and ``model`` (tensor parallel). Everything
placed on a mesh has logical axes: the parameters and their FP8/int8 scales (from the weight
table, ``grok.params``), the KV cache (``KV_CACHE_AXES``) and the residual stream
(``ACTIVATION_AXES``). ``ShardingRules`` maps each logical axis to a mesh axis or to nothing
(replicated), for all of them through one function, ``ShardingRules.partition_spec``:

    heads (N), kv_heads (K), mlp (F), expert_mlp (Fe), vocab (V) -> "model"
    batch (B)                                                    -> "data"
    everything else (layers, embed, head_dim, experts, router, cache_seq, seq) -> replicated

Splitting Fe over ``model`` is the release's own 8-way expert split. Three rules complete it:
- K smaller than the model axis (Grok-2: K = 8, model = 16): the K heads (the kv
  projections and the KV cache alike) are replicated over ``model``, as the serving engines
  do; each query head still reads its own kv head, so the logits are unchanged.
- a dimension of size 1 (the input dims of a per-channel scale) is never split.
- any other dimension the mesh axis does not divide: for a parameter, a ``ShardingError``
  raised by ``place_weights`` before a byte of the checkpoint is read; for the KV cache
  and the residual stream (``strict=False``), replicated, so generation takes any batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from grok.config import GrokConfig
from grok.errors import ShardingError
from grok.params import WeightSpec, weight_specs
from grok.quant import scale_shape

DATA = "data"
MODEL = "model"
MESH_AXES = (DATA, MODEL)
KV_CACHE_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")  # [L, B, S, K, H]
ACTIVATION_AXES = ("batch", "seq", "embed")  # [B, T, D]

DEFAULT_RULES: Mapping[str, str | None] = {
    "batch": DATA,
    "heads": MODEL,
    "kv_heads": MODEL,
    "mlp": MODEL,
    "expert_mlp": MODEL,
    "vocab": MODEL,
    "layers": None,
    "embed": None,
    "head_dim": None,
    "experts": None,
    "router_out": None,
    "cache_seq": None,
    "seq": None,
}

# Axes replicated instead of split when the mesh axis is a multiple of their size.
REPLICATE_WHEN_SMALLER = frozenset({"kv_heads"})


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis (or None for replicated). Unknown logical axes are an error."""

    table: Mapping[str, str | None] = dataclasses.field(default_factory=lambda: dict(DEFAULT_RULES))

    def mesh_axis(self, logical: str) -> str | None:
        if logical not in self.table:
            raise ShardingError(
                f"logical axis {logical!r} has no sharding rule; rules cover {sorted(self.table)}"
            )
        return self.table[logical]

    def partition_spec(
        self,
        axes: Sequence[str],
        shape: Sequence[int],
        mesh_sizes: Mapping[str, int],
        what: str,
        *,
        strict: bool = True,
    ) -> PartitionSpec:
        """The PartitionSpec of an array with logical ``axes`` and ``shape`` on the mesh.

        Raises ShardingError when two logical axes map to the same mesh axis, or (``strict``)
        when a mesh axis does not divide the dimension it splits, except kv_heads,
        replicated when the mesh axis is a multiple of K. Size-1 dims are never split.
        Without ``strict`` an undivided dimension, or one whose mesh axis the mesh lacks,
        is replicated.
        """
        used: dict[str, str] = {}
        out: list[str | None] = []
        for logical, size in zip(axes, shape, strict=True):
            mesh_axis = self.mesh_axis(logical)
            if mesh_axis is None:
                out.append(None)
                continue
            if mesh_axis not in mesh_sizes and not strict:
                out.append(None)  # the cache or the activations on a mesh without that axis
                continue
            if mesh_axis not in mesh_sizes:
                raise ShardingError(
                    f"{what}: rule {logical!r} -> {mesh_axis!r} names a mesh axis the mesh "
                    f"lacks; mesh axes are {list(mesh_sizes)}"
                )
            if mesh_axis in used:
                raise ShardingError(
                    f"{what}: logical axes {used[mesh_axis]!r} and {logical!r} both map to "
                    f"mesh axis {mesh_axis!r}; a mesh axis can split one dimension only"
                )
            used[mesh_axis] = logical
            n = mesh_sizes[mesh_axis]
            if n == 1 or size == 1:
                out.append(None)
            elif size % n == 0:
                out.append(mesh_axis)
            elif logical in REPLICATE_WHEN_SMALLER and n > size and n % size == 0:
                out.append(None)  # K < model: replicate the kv heads over the model axis
            elif not strict:
                out.append(None)
            else:
                raise ShardingError(
                    f"{what}: dimension {logical!r} of size {size} cannot be split over mesh "
                    f"axis {mesh_axis!r} of size {n}; pick a mesh whose {mesh_axis!r} axis "
                    f"divides {size}"
                )
        return PartitionSpec(*out)


def make_mesh(data: int = 1, model: int | None = None, devices: Sequence | None = None) -> Mesh:
    """A ("data", "model") mesh over ``devices`` (default: all); ``model`` defaults to the rest.

    Asked for fewer devices than there are, it takes the first ``data * model`` of them
    (4-way TP on an 8-device machine: ``make_mesh(1, 4)``). On several hosts,
    ``jax.devices()`` lists every process's devices, so the same call builds the same
    global mesh everywhere (after ``jax.distributed.initialize``).
    """
    devices = list(jax.devices() if devices is None else devices)
    if data < 1 or (model is not None and model < 1):
        raise ShardingError(f"mesh ({data}, {model}) needs positive axis sizes")
    if model is None:
        if len(devices) % data:
            raise ShardingError(f"data={data} does not divide the {len(devices)} devices")
        model = len(devices) // data
    if data * model > len(devices):
        raise ShardingError(
            f"mesh ({data}, {model}) needs {data * model} devices, found {len(devices)}"
        )
    grid = np.array(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 2)


def auto_axes(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis of type Auto (the same devices and names).

    ``jax.make_mesh`` gives Explicit axes by default in current JAX; the model's gathers and
    sharding constraints are written for Auto axes, where the compiler propagates shardings.
    """
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim)


def mesh_sizes(mesh: Mesh | None) -> dict[str, int]:
    """{axis name: size} of a mesh; ``{"data": 1, "model": 1}`` for None (one device)."""
    if mesh is None:
        return {DATA: 1, MODEL: 1}
    return dict(zip(mesh.axis_names, np.shape(mesh.devices), strict=True))


def param_partition_spec(
    spec: WeightSpec, sizes: Mapping[str, int], rules: ShardingRules | None = None
) -> PartitionSpec:
    """The PartitionSpec of parameter ``spec`` on a mesh with axis ``sizes``."""
    rules = rules or ShardingRules()
    return rules.partition_spec(spec.axes, spec.shape, sizes, f"{spec.module}/{spec.name}")


def scale_partition_spec(
    spec: WeightSpec, sizes: Mapping[str, int], rules: ShardingRules | None = None
) -> PartitionSpec:
    """The spec of ``spec``'s per-output-channel scale: its axes, the (size-1) in dims whole."""
    rules = rules or ShardingRules()
    shape = scale_shape(spec.shape, spec.in_dims)
    return rules.partition_spec(spec.axes, shape, sizes, f"{spec.module}/{spec.name}_scale")


@dataclasses.dataclass(frozen=True)
class WeightPlacement:
    """One parameter on a mesh of given axis sizes.

    Attributes:
      spec: the parameter (``grok.params.WeightSpec``).
      pspec: the PartitionSpec of its array.
      scale_pspec: the PartitionSpec of its per-output-channel scale where it may be stored
        quantised (``spec.quantized``), else None.
    """

    spec: WeightSpec
    pspec: PartitionSpec
    scale_pspec: PartitionSpec | None


def place_weights(
    specs: Sequence[WeightSpec], sizes: Mapping[str, int], rules: ShardingRules | None = None
) -> tuple[WeightPlacement, ...]:
    """Every parameter of ``specs`` placed on a mesh of axis ``sizes``, in order.

    Raises ShardingError for the first dimension the mesh cannot split: the one check of a
    mesh against the weights, run before a byte of a checkpoint is read. The loader's plan,
    the memory plan and ``param_partition_specs`` are all built from this.
    """
    rules = rules or ShardingRules()
    return tuple(
        WeightPlacement(
            spec,
            param_partition_spec(spec, sizes, rules),
            scale_partition_spec(spec, sizes, rules) if spec.quantized else None,
        )
        for spec in specs
    )


def param_partition_specs(
    config: GrokConfig, sizes: Mapping[str, int], rules: ShardingRules | None = None
) -> dict[str, dict[str, PartitionSpec]]:
    """Every parameter's PartitionSpec, as a Haiku-shaped tree; raises ShardingError early.

    Takes axis sizes, not a mesh, so a plan for 16 devices can be checked on any machine.
    """
    out: dict[str, dict[str, PartitionSpec]] = {}
    for placed in place_weights(weight_specs(config), sizes, rules):
        out.setdefault(placed.spec.module, {})[placed.spec.name] = placed.pspec
    return out


def check_divisible(
    config: GrokConfig, sizes: Mapping[str, int], rules: ShardingRules | None = None
) -> None:
    """Raises ShardingError if the mesh cannot hold ``config``'s parameters (``place_weights``)."""
    place_weights(weight_specs(config), sizes, rules)


def kv_cache_spec(
    config: GrokConfig,
    sizes: Mapping[str, int],
    batch_size: int,
    context: int,
    rules: ShardingRules | None = None,
) -> PartitionSpec:
    """PartitionSpec of the KV cache's k/v [L, B, S, K, H] (``KV_CACHE_AXES``).

    B over ``data`` and K over ``model`` where they divide, else replicated (like the k/v
    projections, by the same rule).
    """
    rules = rules or ShardingRules()
    shape = (
        config.num_hidden_layers,
        batch_size,
        context,
        config.num_key_value_heads,
        config.head_dim,
    )
    return rules.partition_spec(KV_CACHE_AXES, shape, sizes, "KV cache", strict=False)


def kv_cache_sharding(
    mesh: Mesh, config: GrokConfig, batch_size: int, rules: ShardingRules | None = None
) -> NamedSharding:
    """Sharding of the KV cache's k/v [L, B, S, K, H] on ``mesh``; see ``kv_cache_spec``."""
    spec = kv_cache_spec(config, mesh_sizes(mesh), batch_size, 1, rules)
    return NamedSharding(mesh, spec)


def activation_spec(rules: ShardingRules | None = None) -> PartitionSpec:
    """PartitionSpec of the residual stream [B, T, D] (``ACTIVATION_AXES``): B over ``data``."""
    rules = rules or ShardingRules()
    return PartitionSpec(*(rules.mesh_axis(a) for a in ACTIVATION_AXES))


def activation_sharding(mesh: Mesh, rules: ShardingRules | None = None) -> NamedSharding:
    """The residual stream [B, T, D] between blocks: batch over ``data``, the rest replicated.

    A mesh without the data axis replicates the batch too.
    """
    spec = activation_spec(rules)
    spec = PartitionSpec(*(p if p is None or p in mesh.axis_names else None for p in spec))
    return NamedSharding(mesh, spec)
