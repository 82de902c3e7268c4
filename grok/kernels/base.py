"""The kernel seam's contract: the operations the model and its layers call.

An implementation is a hashable, immutable object (a frozen dataclass) handed to
``grok.model.forward_fns`` and to the Haiku modules' constructors; ``grok.kernels.select``
picks one. The model never asks which implementation it runs on: whatever an implementation
needs for its platform (views of weights read in place, a cache held in another dtype) stays
inside it, behind these operations.

Glossary: B batch, T query positions, S cache slots, K kv heads, G = N / K, H head dim,
L layers, E experts, A rows of a grouped product, D model width, V vocab; for the paged KV
cache, M pages of Z tokens and W page-table entries per row.

A *weight* below is what the layers get from the parameters: a plain array, a
``grok.layers.QuantWeight``, or the implementation's own view of one (from ``weights_at`` or
``layer_experts``). The layers only read its ``shape``, ``ndim`` and ``dtype``, index its
leading (expert) axis, ``reshape`` a matrix, ``astype`` it, and hand it back to these
operations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from grok.kv_cache import KVCache, LayerCache, PagedKVCache

Weight = Any  # an array, a QuantWeight, or an implementation's view of a weight


class Kernels(Protocol):
    """The operations of the seam (``grok.kernels.xla.XlaKernels`` is the reference)."""

    platform: str | None  # the platform of the devices the program is compiled for

    # The layer loop (``grok.model``: one scan over the layer index).

    def loop_weights(self, params: dict) -> tuple[Any, Any]:
        """How the stacked per-layer parameters (``{module: {name: [L, ...]}}``) enter the
        layer loop: ``(scanned, fixed)``, the part the scan slices per layer (leading axis L)
        and the part every step sees whole."""

    def weights_at(self, scanned: Any, fixed: Any, layer: jax.Array) -> dict:
        """Layer ``layer``'s parameters ``{module: {name: weight}}`` from the scan's slice of
        ``scanned`` and from ``fixed``."""

    def layer_experts(self, w: Weight, layer: jax.Array) -> Weight:
        """Layer ``layer``'s experts [E, ...] of the stacked expert weight ``w`` [L, E, ...]:
        ``experts[e]`` is one expert's matrix, read without copying the other experts."""

    def dense(self, w: Weight) -> jax.Array:
        """A weight as a plain array (a ``QuantWeight`` of plain arrays), for the uses no
        operation here takes (norms, the router, the reference MoE)."""

    def embed(self, table: jax.Array, ids: jax.Array) -> jax.Array:
        """``table[ids]``: rows of ``table`` [V, D] for int ids of any shape."""

    # Products.

    def project(
        self, equation: str, x: jax.Array, w: Weight, out_dtype: jnp.dtype | None = None
    ) -> jax.Array:
        """``einsum(equation, x, w)`` accumulated in float32, returned in ``out_dtype``
        (default ``x``'s). ``x`` is the activation (its first axis a batch axis the output
        keeps), ``w`` a weight of ``x``'s dtype or a ``QuantWeight`` (its values in ``x``'s
        dtype times its per-output-channel scale, applied to the float32 sums: never a
        dequantised copy of the weight), e.g. ``project("BTD,OD->BTO", x, w)``."""

    def grouped(
        self, xs: jax.Array, w: Weight, sizes: jax.Array, row_group: jax.Array, in_axis: int
    ) -> jax.Array:
        """Rows ``xs`` [A, In] sorted by group (``sizes`` [G] rows each; ``row_group`` [A]
        each row's group) times their group's matrix of ``w`` ([G, Out, In], or [G, In, Out]
        for ``in_axis`` 1): [A, Out] float32; rows past the sizes' total are 0."""

    def expert_mlp(
        self,
        xs: jax.Array,
        w1: Weight,
        w3: Weight,
        w2: Weight,
        sizes: jax.Array,
        row_group: jax.Array,
        gate: Callable[[jax.Array, jax.Array], jax.Array],
    ) -> jax.Array:
        """The experts' gated MLP on rows ``xs`` [A, D] sorted by expert (``sizes`` [E] rows
        each, ``row_group`` [A] each row's expert): ``gate(xs w1_e^T, xs w3_e^T) w2_e^T`` for
        each row's expert e, the products ``grouped``'s rounded to ``xs``' dtype; w1/w3
        [E, Fe, D] and w2 [E, D, Fe] (``layer_experts`` views). ``gate(h1, h3)`` [A, Fe] -> [A, Fe].
        Returns [A, D] in ``xs``' dtype."""

    def expert_path(self, tokens: int, assignments: int, experts: int) -> str:
        """The MoE path ("gather", "blocks" or "ragged", see ``grok.moe``) for ``tokens``
        tokens making ``assignments`` token-expert pairs over ``experts`` experts."""

    # Attention and the KV cache.

    def attend(
        self,
        q: jax.Array,
        keys: jax.Array,
        values: jax.Array,
        tau: jax.Array,
        positions: jax.Array,
        lengths: jax.Array,
        *,
        scale: float,
        cap: float | None,
    ) -> jax.Array:
        """Causal grouped-query attention: q [B, T, K, G, H] over keys and values [B, S, K, H]
        (arrays, or what ``cache_write`` returned); query (b, t) sees keys
        j <= positions[b, t] with j < lengths[b], its logits ``cap * tanh(q . k * scale /
        cap) * tau[b, t]`` (no tanh when ``cap`` is None), the probabilities rounded to the
        values' dtype. Returns [B, T, K, G, H] in the values' dtype."""

    def cache_write(
        self, cache: LayerCache, k: jax.Array, v: jax.Array, start: jax.Array
    ) -> tuple[LayerCache, Any, Any]:
        """Writes one layer's new keys and values ``k``, ``v`` [B, T, K, H] into the whole
        cache at slots start[b] .. + T of row b: (the new ``LayerCache``, that layer's keys,
        its values), the last two [B, S, K, H] for ``attend``."""

    # The paged KV cache (``grok.kv_cache.PagedKVCache``): a pool of M pages of Z tokens,
    # [L, M, Z, K, H], read and written through page tables [B, W].

    def paged_write(
        self, cache: LayerCache, k: jax.Array, v: jax.Array, start: jax.Array
    ) -> LayerCache:
        """Writes one layer's new keys and values ``k``, ``v`` [B, T, K, H] through the page
        tables ``cache.pages`` [B, W]: position p = start[b] + t of row b into page
        ``pages[b, p // Z]`` at offset ``p % Z`` (``grok.kv_cache.page_slots``); a position
        past the table or at an entry >= M (no page) is dropped. Returns the new
        ``LayerCache``."""

    def paged_attend(
        self,
        q: jax.Array,
        cache: LayerCache,
        tau: jax.Array,
        positions: jax.Array,
        lengths: jax.Array,
        *,
        scale: float,
        cap: float | None,
    ) -> jax.Array:
        """``attend`` over layer ``cache.layer`` of the pool, read through ``cache.pages``
        [B, W]: key s of row b sits in page ``pages[b, s // Z]`` at offset ``s % Z``
        (S = W * Z; an entry >= M is read as page M - 1, which only masked keys do).
        Returns [B, T, K, G, H] in the cache's dtype."""

    def paged_width(self, pages: int, most: int, page_size: int) -> int:
        """The page-table width W a compiled program should take when its rows need up to
        ``pages`` pages (<= ``most``, the width of a whole context) of ``page_size`` tokens:
        an implementation that reads every entry wants few (each width one compile), one that
        reads only the pages below each row's length takes ``most`` (one compile)."""

    def carry(self, cache: KVCache | PagedKVCache) -> KVCache | PagedKVCache:
        """The cache (dense or paged) in the form the layer loop and a decode loop carry
        between steps (what ``cache_write`` and ``paged_write`` write into). A decode loop
        holds its cache so: ``carry`` once before the loop, ``uncarry`` before each step's
        model call and ``carry`` after it (the pair cancels inside a compiled step),
        ``uncarry`` once after the loop."""

    def uncarry(self, cache: KVCache | PagedKVCache, dtype: jnp.dtype) -> KVCache | PagedKVCache:
        """Undoes ``carry``: the cache with k and v in ``dtype``, the cache's own."""
