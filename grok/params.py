"""One description of every weight: its Haiku path, shape, logical axes and released name.

This table drives loading (name mapping and shape checks), sharding (logical axes -> mesh
axes) and the checkpoint writer, so the three cannot disagree. A test checks that it
matches the tree ``hk.transform(...).init`` creates.

Released tensors are PyTorch ``[out, in]``; ours are ``[in, out...]``. A weight with
``transpose=True`` is ``hf.T.reshape(per-layer shape)``: q_proj [N*H, D] -> [D, N, H],
o_proj [D, N*H] -> [N, H, D], w1 [Fe, D] -> [D, Fe], and so on.

Logical axes: layers (L), vocab (V), embed (D), heads (N), kv_heads (K), head_dim (H),
mlp (F), experts (E), expert_mlp (Fe), router_out (E of the router).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np

from grok.config import GrokConfig

LAYERS = "grok/layers/layer"


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One parameter of the Haiku tree.

    Attributes:
      module, name: where it sits in the Haiku tree (``params[module][name]``).
      shape: full shape, with the leading L axis for per-layer weights and E for experts.
      axes: logical axis names, one per dim of ``shape``.
      hf_name: released tensor name, with ``{i}`` for the layer and ``{e}`` for the expert.
      transpose: the released tensor is ``[out, in]`` and needs ``.T`` then a reshape.
      float32: kept in float32 whatever the model dtype (the router).
      tp_dim: for expert tensors, the released dim that the TP files split (w1/w3: 0, w2: 1).
      in_axes: how many leading unit axes make the released ``in`` dim (o_proj: N and H).
    """

    module: str
    name: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    hf_name: str
    transpose: bool = False
    float32: bool = False
    tp_dim: int | None = None
    in_axes: int = 1

    @property
    def per_layer(self) -> bool:
        return self.axes[0] == "layers"

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.hf_name

    @property
    def unit_shape(self) -> tuple[int, ...]:
        """Shape of one layer's (and one expert's) slice."""
        return self.shape[int(self.per_layer) + int(self.per_expert) :]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """Full shape of one released tensor (one layer, one expert, TP stitched)."""
        unit = self.unit_shape
        if not self.transpose:
            return unit
        return (int(np.prod(unit[self.in_axes :])), int(np.prod(unit[: self.in_axes])))

    def dtype(self, model_dtype: jnp.dtype) -> jnp.dtype:
        return jnp.dtype(jnp.float32) if self.float32 else jnp.dtype(model_dtype)

    def hf_names(self) -> Iterator[tuple[tuple[int, ...], str]]:
        """(unit index (layer[, expert]), released name) for every released tensor."""
        layers = range(self.shape[0]) if self.per_layer else [None]
        for i in layers:
            experts = range(self.shape[1 if self.per_layer else 0]) if self.per_expert else [None]
            for e in experts:
                index = tuple(x for x in (i, e) if x is not None)
                yield index, self.hf_name.format(i=i, e=e)


def weight_specs(config: GrokConfig) -> list[WeightSpec]:
    """Every parameter of the model for ``config``, in a fixed order."""
    c = config
    L, V, D = c.num_hidden_layers, c.vocab_size, c.hidden_size
    N, K, H = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    F, E, Fe = c.intermediate_size, c.num_local_experts, c.moe_intermediate_size
    p = "model.layers.{i}."
    specs = [
        WeightSpec("grok", "embed_tokens", (V, D), ("vocab", "embed"), "model.embed_tokens.weight"),
    ]
    if not c.tie_word_embeddings:
        specs.append(WeightSpec("grok", "lm_head", (V, D), ("vocab", "embed"), "lm_head.weight"))
    specs.append(WeightSpec("grok/final_norm", "weight", (D,), ("embed",), "model.norm.weight"))
    attn = f"{LAYERS}/attn"
    specs += [
        WeightSpec(
            attn,
            "q_proj",
            (L, D, N, H),
            ("layers", "embed", "heads", "head_dim"),
            p + "self_attn.q_proj.weight",
            transpose=True,
        ),
        WeightSpec(
            attn,
            "k_proj",
            (L, D, K, H),
            ("layers", "embed", "kv_heads", "head_dim"),
            p + "self_attn.k_proj.weight",
            transpose=True,
        ),
        WeightSpec(
            attn,
            "v_proj",
            (L, D, K, H),
            ("layers", "embed", "kv_heads", "head_dim"),
            p + "self_attn.v_proj.weight",
            transpose=True,
        ),
        WeightSpec(
            attn,
            "o_proj",
            (L, N, H, D),
            ("layers", "heads", "head_dim", "embed"),
            p + "self_attn.o_proj.weight",
            transpose=True,
            in_axes=2,
        ),
    ]
    for norm in ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm"):
        specs.append(
            WeightSpec(
                f"{LAYERS}/{norm}", "weight", (L, D), ("layers", "embed"), p + f"{norm}.weight"
            )
        )
    if c.has_dense_mlp:
        mlp = f"{LAYERS}/mlp"
        specs += [
            WeightSpec(
                mlp,
                "gate_proj",
                (L, D, F),
                ("layers", "embed", "mlp"),
                p + "mlp.gate_proj.weight",
                transpose=True,
            ),
            WeightSpec(
                mlp,
                "up_proj",
                (L, D, F),
                ("layers", "embed", "mlp"),
                p + "mlp.up_proj.weight",
                transpose=True,
            ),
            WeightSpec(
                mlp,
                "down_proj",
                (L, F, D),
                ("layers", "mlp", "embed"),
                p + "mlp.down_proj.weight",
                transpose=True,
            ),
        ]
    moe, experts, ex = f"{LAYERS}/moe", "grok/experts", p + "block_sparse_moe.experts.{e}."
    specs += [
        WeightSpec(
            moe,
            "router",
            (L, D, E),
            ("layers", "embed", "router_out"),
            p + "block_sparse_moe.gate.weight",
            transpose=True,
            float32=True,
        ),
        WeightSpec(
            experts,
            "w1",
            (L, E, D, Fe),
            ("layers", "experts", "embed", "expert_mlp"),
            ex + "w1.weight",
            transpose=True,
            tp_dim=0,
        ),
        WeightSpec(
            experts,
            "w3",
            (L, E, D, Fe),
            ("layers", "experts", "embed", "expert_mlp"),
            ex + "w3.weight",
            transpose=True,
            tp_dim=0,
        ),
        WeightSpec(
            experts,
            "w2",
            (L, E, Fe, D),
            ("layers", "experts", "expert_mlp", "embed"),
            ex + "w2.weight",
            transpose=True,
            tp_dim=1,
        ),
    ]
    return specs


def count_parameters(config: GrokConfig) -> int:
    """Total parameter count implied by the weight table."""
    return sum(int(np.prod(s.shape)) for s in weight_specs(config))


def hf_to_unit(spec: WeightSpec, hf: np.ndarray) -> np.ndarray:
    """A released tensor (one layer/expert) in our layout: ``.T`` and reshape when needed."""
    if not spec.transpose:
        return hf
    return hf.T.reshape(spec.unit_shape)


def unit_to_hf(spec: WeightSpec, unit: np.ndarray) -> np.ndarray:
    """Inverse of ``hf_to_unit``: our layout back to the released ``[out, in]``."""
    if not spec.transpose:
        return unit
    return unit.reshape(int(np.prod(unit.shape[: spec.in_axes])), -1).T


def _flat_range(slices: tuple[slice, ...], dims: tuple[int, ...]) -> tuple[slice, tuple]:
    """The flat (row-major) range covering ``slices`` over ``dims``, and what to slice after.

    The range spans the first axis's slice with the inner axes whole; slices of the inner
    axes are returned to apply after the reshape.
    """
    slices = tuple(slices) + (slice(None),) * (len(dims) - len(slices))
    start, stop, _ = slices[0].indices(dims[0])
    inner = int(np.prod(dims[1:]))
    return slice(start * inner, stop * inner), slices[1:]


def hf_region(spec: WeightSpec, unit_index: tuple[slice, ...]) -> tuple[slice, slice | None]:
    """The released rows and columns that a slice of one unit (our layout) needs.

    For a transposed weight our axes are ``[in_1, .., out_1, ..]`` and the released tensor
    is ``[prod(out), prod(in)]``: a slice of ``out_1`` (``in_1``) maps to a contiguous row
    (column) range. Returns (row slice, column slice or None for 1-D tensors).
    """
    unit_index = tuple(unit_index) + (slice(None),) * (len(spec.unit_shape) - len(unit_index))
    if not spec.transpose:
        return unit_index[0], (unit_index[1] if len(unit_index) > 1 else None)
    unit, k = spec.unit_shape, spec.in_axes
    cols, _ = _flat_range(unit_index[:k], unit[:k])
    rows, _ = _flat_range(unit_index[k:], unit[k:])
    return rows, cols


def region_to_unit(
    spec: WeightSpec, hf_block: np.ndarray, unit_index: tuple[slice, ...]
) -> np.ndarray:
    """Turns the released block read by ``hf_region`` into the requested unit slice."""
    unit_index = tuple(unit_index) + (slice(None),) * (len(spec.unit_shape) - len(unit_index))
    if not spec.transpose:
        return hf_block
    unit, k = spec.unit_shape, spec.in_axes
    _, in_rest = _flat_range(unit_index[:k], unit[:k])
    _, out_rest = _flat_range(unit_index[k:], unit[k:])
    n_in = len(range(*unit_index[0].indices(unit[0])))
    n_out = len(range(*unit_index[k].indices(unit[k])))
    block = hf_block.T.reshape(n_in, *unit[1:k], n_out, *unit[k + 1 :])
    post = (slice(None), *in_rest, slice(None), *out_rest)
    return block[post]
