"""Placing the model on a device mesh: one table from logical axes to mesh axes.

The mesh has two named axes: ``data`` (batch, B) and ``model`` (tensor parallel). Every
parameter's logical axes come from the weight table (``grok.params``); ``ShardingRules`` maps
each logical axis to a mesh axis or to nothing (replicated):

    heads (N), kv_heads (K), mlp (F), expert_mlp (Fe), vocab (V) -> "model"
    batch (B)                                                    -> "data"
    everything else (layers, embed, head_dim, experts, router)   -> replicated

Splitting Fe over ``model`` is the release's own 8-way expert split. Two rules complete it:
- K smaller than the model axis (Grok-2: K = 8, model = 16): the kv projections are
  replicated over ``model``, as the serving engines do; each query head still reads its own
  kv head, the compiler inserts no extra maths, so the logits are unchanged.
- any other dimension the mesh axis does not divide is a ``ShardingError`` raised by
  ``check_divisible`` before a byte of the checkpoint is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from grok.config import GrokConfig
from grok.errors import ShardingError
from grok.params import WeightSpec, weight_specs

DATA = "data"
MODEL = "model"
MESH_AXES = (DATA, MODEL)

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
}

# Axes that may be replicated instead of split when the mesh axis exceeds their size.
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
    ) -> PartitionSpec:
        """The PartitionSpec of an array with logical ``axes`` and ``shape`` on the mesh.

        Raises ShardingError when two logical axes map to the same mesh axis, or when a
        mesh axis does not divide the dimension it splits (except kv_heads, replicated when
        the mesh axis is larger than K).
        """
        used: dict[str, str] = {}
        out: list[str | None] = []
        for logical, size in zip(axes, shape, strict=True):
            mesh_axis = self.mesh_axis(logical)
            if mesh_axis is None:
                out.append(None)
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
            if n == 1:
                out.append(None)
            elif size % n == 0:
                out.append(mesh_axis)
            elif logical in REPLICATE_WHEN_SMALLER and n > size and n % size == 0:
                out.append(None)  # K < model: replicate the kv heads over the model axis
            else:
                raise ShardingError(
                    f"{what}: dimension {logical!r} of size {size} cannot be split over mesh "
                    f"axis {mesh_axis!r} of size {n}; pick a mesh whose {mesh_axis!r} axis "
                    f"divides {size}"
                )
        return PartitionSpec(*out)


def make_mesh(data: int = 1, model: int | None = None, devices: Sequence | None = None) -> Mesh:
    """A ("data", "model") mesh over ``devices`` (default: all); ``model`` defaults to the rest.

    On several hosts, ``jax.devices()`` lists every process's devices, so the same call
    builds the same global mesh everywhere (after ``jax.distributed.initialize``).
    """
    devices = list(jax.devices() if devices is None else devices)
    if model is None:
        if len(devices) % data:
            raise ShardingError(f"data={data} does not divide the {len(devices)} devices")
        model = len(devices) // data
    if data * model != len(devices):
        raise ShardingError(
            f"mesh ({data}, {model}) needs {data * model} devices, found {len(devices)}"
        )
    grid = np.array(devices, dtype=object).reshape(data, model)
    return Mesh(grid, MESH_AXES)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    """{axis name: size} of a mesh."""
    return dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))


def param_partition_spec(
    spec: WeightSpec, sizes: Mapping[str, int], rules: ShardingRules | None = None
) -> PartitionSpec:
    """The PartitionSpec of parameter ``spec`` on a mesh with axis ``sizes``."""
    rules = rules or ShardingRules()
    return rules.partition_spec(spec.axes, spec.shape, sizes, f"{spec.module}/{spec.name}")


def param_partition_specs(
    config: GrokConfig, sizes: Mapping[str, int], rules: ShardingRules | None = None
) -> dict[str, dict[str, PartitionSpec]]:
    """Every parameter's PartitionSpec, as a Haiku-shaped tree; raises ShardingError early.

    Takes axis sizes, not a mesh, so a plan for 16 devices can be checked on any machine.
    """
    out: dict[str, dict[str, PartitionSpec]] = {}
    for spec in weight_specs(config):
        out.setdefault(spec.module, {})[spec.name] = param_partition_spec(spec, sizes, rules)
    return out


def check_divisible(
    config: GrokConfig, sizes: Mapping[str, int], rules: ShardingRules | None = None
) -> None:
    """Raises ShardingError if the mesh cannot hold ``config``'s parameters."""
    param_partition_specs(config, sizes, rules)


def scale_partition_spec(pspec: PartitionSpec, ndim: int, in_dims: Sequence[int]) -> PartitionSpec:
    """The spec of a per-output-channel scale: the weight's, with the (size-1) in dims whole."""
    parts = list(pspec) + [None] * (ndim - len(pspec))
    return PartitionSpec(*(None if d in in_dims else p for d, p in enumerate(parts)))


def sharding_fn(mesh: Mesh, rules: ShardingRules | None = None):
    """``spec -> NamedSharding`` for ``ReleasedCheckpoint.load_params``."""
    sizes = mesh_sizes(mesh)

    def sharding_for(spec: WeightSpec) -> NamedSharding:
        return NamedSharding(mesh, param_partition_spec(spec, sizes, rules))

    return sharding_for


def activation_spec(rules: ShardingRules | None = None) -> PartitionSpec:
    """PartitionSpec of a [B, T, D] activation between blocks: B over ``data``."""
    rules = rules or ShardingRules()
    return PartitionSpec(rules.mesh_axis("batch"), None, None)


def kv_cache_sharding(
    mesh: Mesh, config: GrokConfig, batch_size: int, rules: ShardingRules | None = None
) -> NamedSharding:
    """Sharding of the KV cache's k/v [L, B, S, K, H]: B over ``data``, K over ``model``.

    Like the k/v projections, the K heads are replicated when the model axis does not divide
    them; a batch the data axis does not divide is replicated too (generation takes any B).
    """
    rules = rules or ShardingRules()
    sizes = mesh_sizes(mesh)

    def axis(logical: str, size: int) -> str | None:
        name = rules.mesh_axis(logical)
        n = sizes.get(name, 1) if name is not None else 1
        return name if n > 1 and size % n == 0 else None

    spec = PartitionSpec(
        None, axis("batch", batch_size), None, axis("kv_heads", config.num_key_value_heads), None
    )
    return NamedSharding(mesh, spec)


def activation_sharding(mesh: Mesh, rules: ShardingRules | None = None) -> NamedSharding:
    """The residual stream [B, T, D] between blocks: batch over ``data``, the rest replicated.

    A mesh without the data axis replicates the batch too.
    """
    spec = activation_spec(rules)
    if spec[0] is not None and spec[0] not in mesh.axis_names:
        spec = PartitionSpec(None, None, None)
    return NamedSharding(mesh, spec)
