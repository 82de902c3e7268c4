"""Grok-1's released checkpoint (``ckpt-0/tensor{i:05d}_000``): its facts and its leaf table.

Facts of the release (xai-org/grok-1 ``model.py``, ``checkpoint.py``, ``run.py``):

- The weights are one pickle per leaf of the Haiku parameter tree, file ``i`` holding leaf ``i``
  of ``jax.tree_util.tree_flatten`` of ``{module path: {param name: array}}``. JAX flattens a
  dict in sorted key order, so the files follow the *string* order of the module paths:
  ``language_model/...`` first, then ``transformer/decoder_layer_0``, ``_1``, ``_10``, ``_11``
  ... ``_19``, ``_2``, ``_20`` ... (layer 10 comes before layer 2), and inside a layer
  ``moe/linear``, ``moe/linear_1``, ``moe/linear_v``, ``multi_head_attention/{key,linear,query,
  value}``, ``rms_norm``, ``rms_norm_1``, ``rms_norm_2``, ``rms_norm_3``, ``router``.
  2 + 12 L files: 770 for L = 64. Only the ``_000`` copy of each is released.
- Shapes are JAX ``[in, out]``: ``in_out_embed/embeddings`` [V, D]; ``query/w`` [D, N*H];
  ``key/w``, ``value/w`` [D, K*H]; ``linear/w`` (attention output) [N*H, D]; every
  ``rms_norm*/scale`` [D]; ``router/w`` [D, E]; ``moe/linear/w`` (gate, W1) and
  ``moe/linear_v/w`` (up, W3) [E, D, Fe]; ``moe/linear_1/w`` (down, W2) [E, Fe, D]. The four
  norms are pre-attention, post-attention, pre-MoE and post-MoE, in that order. There is no
  output head (it is tied to the embedding) and no dense MLP.
- The pickles are protocol 4. Plain leaves (embedding, norms, router) are float32 numpy arrays
  (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``). The seven
  matrices of a layer are a ``__main__.QuantizedWeight8bit`` (the class was defined in the
  saving script; the release's loader puts it on ``sys.modules['__main__']``) whose state is
  ``{'weight': int8 array, 'scales': bfloat16 array}``. ``scales`` has the weight's rank: for
  the matrices whose output axis the release's 8-way model axis shards (query, key, value,
  moe/linear, moe/linear_v) it is ``[..., 1, out]``; for those whose input axis it shards
  (attention linear, moe/linear_1) it is ``[..., 8, out]``, one scale row per block of in/8
  rows. The weight is ``weight * scales`` with each scale row spread over its block.

Here each leaf becomes the Hugging Face tensor(s) of ``docs/spec.md`` section 4, in
PyTorch ``[out, in]`` layout, experts split per expert. Quantised matrices stay quantised: a
``QuantizedWeight8bit`` whose int8 ``weight`` is ``[out, in]`` and whose ``scales`` follow the
block rule below, so ``o_proj`` has scales [D, 8] and ``w2`` [D, 8] (blocks of the input axis),
``q_proj``/``k_proj``/``v_proj``/``w1``/``w3`` scales [out, 1].

Block rule: ``scales`` has the rank of ``weight`` and each of its axes is 1 (broadcast), the
weight's length, or a divisor G of it, meaning G equal contiguous blocks along that axis share a
scale. The rule is the same before and after a transpose, so transposing both arrays together
keeps the meaning.

Shape letters: V vocab, D width, N query heads, K kv heads, H head dim, E experts,
Fe expert width, L layers, G scale blocks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_dtypes
import numpy as np
from numpy.typing import DTypeLike

from grok.config import GrokConfig
from grok.errors import CheckpointError, ConfigError

RELEASE_SUBDIR = "ckpt-0"
# The release's mesh is (data 1, model 8): a matrix sharded on its input axis got one scale
# row per shard.
RELEASE_MODEL_SHARDS = 8
INT8_MAX = 127

# The dtypes a float leaf or a record's scales may come in.
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))


def release_file_name(index: int) -> str:
    """The release's name for leaf ``index``: ``tensor{index:05d}_000``."""
    return f"tensor{index:05d}_000"


# Quantised weights.


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedWeight8bit:
    """An int8 weight and its scales; the value is ``weight * scales`` under the block rule.

    ``weight`` is int8. ``scales`` (bfloat16 in the release) has the same rank, and each of its
    axes is 1, the weight's length along that axis, or a divisor G of it (G contiguous blocks
    share a scale). In this library's dict the weight is ``[out, in]`` and the scales are
    ``[out, 1]`` or ``[out, G]``. The release pickles this record as
    ``__main__.QuantizedWeight8bit`` with state ``{'weight': ..., 'scales': ...}``.
    """

    weight: np.ndarray
    scales: np.ndarray

    def __post_init__(self) -> None:
        for name in ("weight", "scales"):
            if not isinstance(getattr(self, name), np.ndarray):
                raise CheckpointError(
                    f"QuantizedWeight8bit {name} must be a numpy array, "
                    f"got {type(getattr(self, name)).__name__}"
                )
        check_quantized(self.weight.dtype, self.weight.shape, self.scales.dtype, self.scales.shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight.shape

    def transpose(self) -> QuantizedWeight8bit:
        """The same matrix transposed (last two axes), both arrays made contiguous."""
        return QuantizedWeight8bit(
            np.ascontiguousarray(np.swapaxes(self.weight, -1, -2)),
            np.ascontiguousarray(np.swapaxes(self.scales, -1, -2)),
        )

    def __getitem__(self, index: int) -> QuantizedWeight8bit:
        """Slice ``index`` of the leading axis (an expert), with the scales that cover it."""
        blocks = self.scales.shape[0]
        per_block = self.weight.shape[0] // blocks
        return QuantizedWeight8bit(self.weight[index], self.scales[index // per_block])


def check_quantized(
    weight_dtype: np.dtype,
    weight_shape: tuple[int, ...],
    scales_dtype: np.dtype,
    scales_shape: tuple[int, ...],
) -> None:
    """CheckpointError unless int8 weight and float scales follow the block rule."""
    if weight_dtype != np.int8:
        raise CheckpointError(f"QuantizedWeight8bit weight must be int8, found {weight_dtype}")
    if scales_dtype not in FLOAT_DTYPES:
        raise CheckpointError(
            f"QuantizedWeight8bit scales must be bfloat16, float16 or float32, found {scales_dtype}"
        )
    if len(weight_shape) == 0 or len(scales_shape) != len(weight_shape):
        raise CheckpointError(
            f"QuantizedWeight8bit scales {scales_shape} must have the rank of weight {weight_shape}"
        )
    for axis, (n, s) in enumerate(zip(weight_shape, scales_shape, strict=True)):
        if s == 0 or n % s:
            raise CheckpointError(
                f"QuantizedWeight8bit scales {scales_shape} do not block weight {weight_shape}: "
                f"axis {axis} has {s} scales for {n} entries (need 1, {n} or a divisor of {n})"
            )


def dequantize(qw: QuantizedWeight8bit, dtype: DTypeLike = np.float32) -> np.ndarray:
    """``weight * scales`` under the block rule, computed in float32 and cast to ``dtype``.

    int8 times a bfloat16 scale is exact in float32, so casting to bfloat16 afterwards gives
    the same numbers as the release's ``weight.astype(bf16) * scales`` computed as a bfloat16
    multiply that rounds the exact product.
    """
    weight_shape: list[int] = []
    scales_shape: list[int] = []
    for n, s in zip(qw.weight.shape, qw.scales.shape, strict=True):
        if s in (1, n):
            weight_shape.append(n)
            scales_shape.append(s)
        else:  # s blocks of n // s entries
            weight_shape += [s, n // s]
            scales_shape += [s, 1]
    weight = qw.weight.reshape(weight_shape).astype(np.float32)
    scales = qw.scales.reshape(scales_shape).astype(np.float32)
    return (weight * scales).reshape(qw.weight.shape).astype(dtype)


# The Grok-1 tree.


@dataclasses.dataclass(frozen=True)
class Grok1Leaf:
    """One released file: where its leaf sits in the Haiku tree and what it becomes.

    Attributes:
      index: the file is ``tensor{index:05d}_000``.
      module, param: the leaf is ``params[module][param]``.
      shape: release shape, JAX ``[in, out]`` (experts ``[E, in, out]``).
      hf_name: Hugging Face name; contains ``{e}`` when the leaf holds all E experts.
      transpose: the Hugging Face tensor is the transpose (``[out, in]``).
      quantized: the release stores it as int8 + scales.
      input_sharded: the release shards the input axis 8 ways, so its scales come in 8 row
        blocks (attention output and expert down projections).
    """

    index: int
    module: str
    param: str
    shape: tuple[int, ...]
    hf_name: str
    transpose: bool = False
    quantized: bool = False
    input_sharded: bool = False

    @property
    def file_name(self) -> str:
        return release_file_name(self.index)

    @property
    def path(self) -> str:
        return f"{self.module}/{self.param}"

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.hf_name

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Hugging Face name -> shape of every tensor this leaf becomes."""
        if self.per_expert:
            unit = self.shape[1:]
            unit = unit[::-1] if self.transpose else unit
            return {self.hf_name.format(e=e): unit for e in range(self.shape[0])}
        return {self.hf_name: self.shape[::-1] if self.transpose else self.shape}


def check_grok1_config(config: GrokConfig) -> None:
    """Raises ConfigError unless ``config`` describes a tree the Grok-1 release can fill."""
    if config.residual_moe:
        raise ConfigError(
            "Grok-1 checkpoints have no dense MLP, but the config has 'residual_moe' true"
        )
    if not config.tie_word_embeddings:
        raise ConfigError(
            "Grok-1 checkpoints have no lm_head (the head is the embedding), but the config "
            "has 'tie_word_embeddings' false"
        )


def grok1_leaves(config: GrokConfig) -> list[Grok1Leaf]:
    """Every released leaf for ``config``, in file order (JAX's sorted-key flatten order)."""
    check_grok1_config(config)
    V, D = config.vocab_size, config.hidden_size
    E, Fe = config.num_local_experts, config.moe_intermediate_size
    q_width = config.num_attention_heads * config.head_dim  # N*H
    kv_width = config.num_key_value_heads * config.head_dim  # K*H
    matrix = {"transpose": True, "quantized": True}
    leaves: dict[tuple[str, str], dict[str, Any]] = {}

    def add(module: str, param: str, shape: tuple[int, ...], hf_name: str, **kind: Any) -> None:
        leaves[(module, param)] = {"shape": shape, "hf_name": hf_name, **kind}

    add("language_model/in_out_embed", "embeddings", (V, D), "model.embed_tokens.weight")
    add("language_model/rms_norm", "scale", (D,), "model.norm.weight")
    for i in range(config.num_hidden_layers):
        layer, hf = f"transformer/decoder_layer_{i}", f"model.layers.{i}"
        attn, moe = f"{layer}/multi_head_attention", f"{layer}/moe"
        experts = f"{hf}.block_sparse_moe.experts.{{e}}"
        add(f"{attn}/query", "w", (D, q_width), f"{hf}.self_attn.q_proj.weight", **matrix)
        add(f"{attn}/key", "w", (D, kv_width), f"{hf}.self_attn.k_proj.weight", **matrix)
        add(f"{attn}/value", "w", (D, kv_width), f"{hf}.self_attn.v_proj.weight", **matrix)
        add(
            f"{attn}/linear",
            "w",
            (q_width, D),
            f"{hf}.self_attn.o_proj.weight",
            input_sharded=True,
            **matrix,
        )
        norms = ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm")
        for k, norm in enumerate(norms):
            suffix = f"_{k}" if k else ""
            add(f"{layer}/rms_norm{suffix}", "scale", (D,), f"{hf}.{norm}.weight")
        add(f"{layer}/router", "w", (D, E), f"{hf}.block_sparse_moe.gate.weight", transpose=True)
        add(f"{moe}/linear", "w", (E, D, Fe), f"{experts}.w1.weight", **matrix)
        add(f"{moe}/linear_v", "w", (E, D, Fe), f"{experts}.w3.weight", **matrix)
        add(
            f"{moe}/linear_1", "w", (E, Fe, D), f"{experts}.w2.weight", input_sharded=True, **matrix
        )
    # jax.tree_util flattens {module: {param: leaf}} in sorted key order at both levels.
    return [
        Grok1Leaf(index=index, module=module, param=param, **leaves[(module, param)])
        for index, (module, param) in enumerate(sorted(leaves))
    ]


def grok1_hf_shapes(config: GrokConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> ``[out, in]`` shape of every tensor a Grok-1 checkpoint yields."""
    shapes: dict[str, tuple[int, ...]] = {}
    for leaf in grok1_leaves(config):
        shapes.update(leaf.hf_shapes())
    return shapes


def check_leaf_shape(leaf: Grok1Leaf, found: tuple[int, ...], leaves: list[Grok1Leaf]) -> None:
    """CheckpointError naming ``leaf`` unless ``found`` is its release shape; the message
    names another of ``leaves`` that has the shape found, when one does."""
    if found == leaf.shape:
        return
    fits = [other for other in leaves if other.shape == found]
    hint = (
        f"; that shape fits {fits[0].path} ({fits[0].file_name}): is the config or the file "
        "order different?"
        if fits
        else ""
    )
    raise CheckpointError(
        f"{leaf.path} ({leaf.hf_name}) has shape {found}, expected {leaf.shape} "
        f"(JAX [in, out] layout){hint}"
    )
