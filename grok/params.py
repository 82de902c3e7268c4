"""One description of every weight: its Haiku path, shape, logical axes and released name.

This table drives loading (name mapping and shape checks), sharding (logical axes -> mesh
axes), quantisation and the checkpoint writer, so they cannot disagree. A test checks that
it matches the tree ``hk.transform(...).init`` creates.

Every matrix keeps the release's PyTorch ``[out, in]`` orientation, and the modules contract
over the trailing (``in``) axes. A parameter's unit (one layer, one expert) is the released
tensor reshaped, never transposed: q_proj [N*H, D] -> [N, H, D], o_proj [D, N*H] -> [D, N, H],
w1 [Fe, D], w2 [D, Fe], router [E, D]. So loading copies file bytes straight into the device
buffers (measured in ``scripts/bench_load.py``: a host transpose ran at 0.1-0.3 GB/s and an
XLA CPU transpose after the transfer at 0.5-0.9 GB/s, against 8 GB/s for a plain read; on an
accelerator the matmul units read either orientation of an operand at the same speed).

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
      shape: full shape, with the leading L axis for per-layer weights and E for experts;
        a matrix's unit is ``[out..., in...]`` (the released ``[out, in]`` reshaped).
      axes: logical axis names, one per dim of ``shape``.
      hf_name: released tensor name, with ``{i}`` for the layer and ``{e}`` for the expert.
      matrix: a linear map, released 2-D ``[out, in]`` (every such weight but the router
        may be stored quantised).
      float32: kept in float32 whatever the model dtype (the router).
      tp_dim: for expert tensors, the released dim that the TP files split (w1/w3: 0, w2: 1).
      in_axes: how many trailing unit axes make the released ``in`` dim (o_proj: N and H).
    """

    module: str
    name: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    hf_name: str
    matrix: bool = False
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
    def lead(self) -> int:
        """How many leading axes index units: the layer axis and the expert axis."""
        return int(self.per_layer) + int(self.per_expert)

    @property
    def unit_shape(self) -> tuple[int, ...]:
        """Shape of one layer's (and one expert's) slice."""
        return self.shape[self.lead :]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """Full shape of one released tensor (one layer, one expert, TP stitched)."""
        unit = self.unit_shape
        if not self.matrix:
            return unit
        k = len(unit) - self.in_axes
        return (int(np.prod(unit[:k])), int(np.prod(unit[k:])))

    @property
    def quantized(self) -> bool:
        """Whether ``quantize`` stores it quantised: every matrix but the router."""
        return self.matrix and not self.float32

    @property
    def in_dims(self) -> tuple[int, ...]:
        """The input (contracted) dims of ``shape``: the last ``in_axes``."""
        n = len(self.shape)
        return tuple(range(n - self.in_axes, n))

    def dtype(self, model_dtype: jnp.dtype) -> jnp.dtype:
        return jnp.dtype(jnp.float32) if self.float32 else jnp.dtype(model_dtype)

    def unit_name(self, unit: tuple[int, ...]) -> str:
        """Released name of unit (layer[, expert]) ``unit``."""
        keys = ("i", "e") if self.per_layer else ("e",)
        return self.hf_name.format(**dict(zip(keys, unit, strict=False)))

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
            (L, N, H, D),
            ("layers", "heads", "head_dim", "embed"),
            p + "self_attn.q_proj.weight",
            matrix=True,
        ),
        WeightSpec(
            attn,
            "k_proj",
            (L, K, H, D),
            ("layers", "kv_heads", "head_dim", "embed"),
            p + "self_attn.k_proj.weight",
            matrix=True,
        ),
        WeightSpec(
            attn,
            "v_proj",
            (L, K, H, D),
            ("layers", "kv_heads", "head_dim", "embed"),
            p + "self_attn.v_proj.weight",
            matrix=True,
        ),
        WeightSpec(
            attn,
            "o_proj",
            (L, D, N, H),
            ("layers", "embed", "heads", "head_dim"),
            p + "self_attn.o_proj.weight",
            matrix=True,
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
                (L, F, D),
                ("layers", "mlp", "embed"),
                p + "mlp.gate_proj.weight",
                matrix=True,
            ),
            WeightSpec(
                mlp,
                "up_proj",
                (L, F, D),
                ("layers", "mlp", "embed"),
                p + "mlp.up_proj.weight",
                matrix=True,
            ),
            WeightSpec(
                mlp,
                "down_proj",
                (L, D, F),
                ("layers", "embed", "mlp"),
                p + "mlp.down_proj.weight",
                matrix=True,
            ),
        ]
    moe, experts, ex = f"{LAYERS}/moe", "grok/experts", p + "block_sparse_moe.experts.{e}."
    specs += [
        WeightSpec(
            moe,
            "router",
            (L, E, D),
            ("layers", "router_out", "embed"),
            p + "block_sparse_moe.gate.weight",
            matrix=True,
            float32=True,
        ),
        WeightSpec(
            experts,
            "w1",
            (L, E, Fe, D),
            ("layers", "experts", "expert_mlp", "embed"),
            ex + "w1.weight",
            matrix=True,
            tp_dim=0,
        ),
        WeightSpec(
            experts,
            "w3",
            (L, E, Fe, D),
            ("layers", "experts", "expert_mlp", "embed"),
            ex + "w3.weight",
            matrix=True,
            tp_dim=0,
        ),
        WeightSpec(
            experts,
            "w2",
            (L, E, D, Fe),
            ("layers", "experts", "embed", "expert_mlp"),
            ex + "w2.weight",
            matrix=True,
            tp_dim=1,
        ),
    ]
    return specs


def count_parameters(config: GrokConfig) -> int:
    """Total parameter count implied by the weight table."""
    return sum(int(np.prod(s.shape)) for s in weight_specs(config))


def hf_to_unit(spec: WeightSpec, hf: np.ndarray) -> np.ndarray:
    """A released tensor (one layer/expert) in our layout: a reshape, never a transpose."""
    return np.reshape(hf, spec.unit_shape)


def unit_to_hf(spec: WeightSpec, unit: np.ndarray) -> np.ndarray:
    """Inverse of ``hf_to_unit``: our unit back to the released (2-D for matrices) shape."""
    return np.reshape(unit, spec.hf_shape)


def hf_region(spec: WeightSpec, unit_index: tuple[slice, ...]) -> tuple[slice, slice, tuple]:
    """The released rows and columns that a slice of one unit needs, and what to slice after.

    A unit is ``[out_1, .., in_1, ..]`` and the released tensor ``[prod(out), prod(in)]``
    (1-D tensors: rows only): a slice of ``out_1`` (``in_1``) with the inner axes whole is a
    contiguous row (column) range. Slices of inner axes are returned (``post``) to apply to
    the region reshaped to ``[n_out_1, out_2.., n_in_1, in_2..]``.
    """
    unit = spec.unit_shape
    unit_index = tuple(unit_index) + (slice(None),) * (len(unit) - len(unit_index))
    k = len(unit) - spec.in_axes if spec.matrix else len(unit)
    rows, out_rest = _flat_range(unit_index[:k], unit[:k])
    if k == len(unit):
        return rows, slice(None), (slice(None), *out_rest)
    cols, in_rest = _flat_range(unit_index[k:], unit[k:])
    return rows, cols, (slice(None), *out_rest, slice(None), *in_rest)


def _flat_range(slices: tuple[slice, ...], dims: tuple[int, ...]) -> tuple[slice, tuple]:
    """The flat (row-major) range covering ``slices`` over ``dims``, and what to slice after.

    The range spans the first axis's slice with the inner axes whole; slices of the inner
    axes are returned to apply after the reshape.
    """
    start, stop, _ = slices[0].indices(dims[0])
    inner = int(np.prod(dims[1:]))
    return slice(start * inner, stop * inner), tuple(slices[1:])
