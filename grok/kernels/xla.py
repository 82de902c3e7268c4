"""The reference implementation of the kernel seam: plain XLA operations.

It runs wherever XLA does: GPUs, TPUs, device meshes (the compiler partitions every operation
here), training, quantised weights, and the CPU where the native kernels do not apply. Its
only platform-dependent choices are made from ``platform``, the platform of the devices the
program is compiled for (``grok.kernels.select``), never from the host's default backend.

Glossary: B batch, T query positions, S key positions / cache slots, K kv heads,
G = N / K query heads per kv head, H head dim, L layers, E experts, A rows (token-expert
assignments) of a grouped product; M pages of Z tokens in a paged cache's pool, W page-table
entries per row.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp

from grok.errors import ConfigError
from grok.kv_cache import KVCache, LayerCache, PagedKVCache, page_slots
from grok.layers import QuantWeight, dequant, soft_cap

# The contracted (input) axis of one layer's expert matrix [E, ., .] as the weight table
# lays it out (the release's [out, in]): 2 for w1/w3 [E, Fe, D] and w2 [E, D, Fe].
EXPERT_IN_AXIS = 2

# The expert path for many assignments (prefill), by platform. XLA's GPU and TPU backends run
# ragged_dot as a grouped matmul. On CPU (jaxlib 0.10.2, D 512, Fe 1024, E 8, k 2, float32
# and bfloat16) it measured 4x (128 tokens) to 13x (1024 tokens) slower than the block path,
# slower even than computing every expert, so the block path stays there, and for platforms
# not listed.
PREFILL_IMPL = {
    "cpu": "blocks",
    "gpu": "ragged",
    "cuda": "ragged",
    "rocm": "ragged",
    "tpu": "ragged",
}
PREFILL_ENV = "GROK_MOE_PREFILL"  # "ragged" or "blocks": overrides PREFILL_IMPL

# XLA:CPU has no native kernel for a bfloat16 matrix-vector product: with one row of
# activations it converts the whole weight to float32 first (and hoists that conversion out of
# loops, so a decode step converted every layer's weights), which made bf16 decode no faster
# than float32. From two rows up the product runs natively (YNNPACK), reading half float32's
# bytes. Measured on the 2-core CPU: 64 MB of bf16 weights times one row in 212 ms, times two
# rows in 5.2 ms (float32, one row: 9.6 ms for the 128 MB). So on the CPU a single low-precision
# row is padded to two; the extra row costs arithmetic only, and a decode step is bound by
# bytes.
MIN_CPU_ROWS = 2

NEG_INF = -1e30  # large negative for masked logits (finite: avoids NaN on empty rows)

# Prompts longer than QUERY_BLOCK queries take the blocked path: queries in blocks of
# QUERY_BLOCK, keys in blocks of KEY_BLOCK with an online softmax, so the live scores are
# [B, K, G, QUERY_BLOCK, KEY_BLOCK] and memory grows linearly with the prompt. 512 x 512
# float32 scores for 8 heads are 8 MiB: big enough for efficient matmuls, small for caches.
QUERY_BLOCK = 512
KEY_BLOCK = 512


def prefill_impl(platform: str | None) -> str:
    """The expert path for many assignments: ``$GROK_MOE_PREFILL`` if set, else
    ``PREFILL_IMPL`` of ``platform``, "blocks" for a platform not listed (or None)."""
    forced = os.environ.get(PREFILL_ENV)
    if forced:
        if forced not in ("ragged", "blocks"):
            raise ConfigError(f"{PREFILL_ENV}={forced!r}: expected 'ragged' or 'blocks'")
        return forced
    return PREFILL_IMPL.get(platform, "blocks")


def output_scale(scale: jax.Array, w_letters: str, out_letters: str) -> jax.Array:
    """A per-output-channel ``scale`` (a weight's shape, its contracted axes 1) laid out to
    multiply the product's output (axes ``out_letters``; those not of the weight are 1)."""
    kept = [c for c in w_letters if c in out_letters]
    s = scale.reshape([n for n, c in zip(scale.shape, w_letters, strict=True) if c in kept])
    order = sorted(kept, key=out_letters.index)
    s = jnp.transpose(s, [kept.index(c) for c in order])
    return s.reshape([s.shape[order.index(c)] if c in kept else 1 for c in out_letters])


def take(w: jax.Array, index) -> jax.Array:
    """``w[index]``: the leading axes of ``w`` picked by int32 scalars (a tuple, or an [n]
    array), taken as ``lax.dynamic_slice`` takes them (a negative index counts from the end,
    then it is clamped into range)."""
    lead = len(index)
    starts = [jnp.asarray(index[k], jnp.int32) for k in range(lead)] + [0] * (w.ndim - lead)
    return jax.lax.dynamic_slice(w, starts, (1,) * lead + w.shape[lead:]).reshape(w.shape[lead:])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerExperts:
    """One layer's experts inside the stacked weight [L, E, ...] of every layer, not sliced out.

    ``experts[e]`` takes layer and expert in one dynamic slice, so a decode step reads only the
    chosen experts' weights: the layer's whole [E, ...] slab sliced first would be a copy of
    every expert, every layer, on backends that copy slices.
    """

    stacked: jax.Array  # [L, E, ...]
    layer: jax.Array  # () int32

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stacked.shape[1:]

    @property
    def ndim(self) -> int:
        return self.stacked.ndim - 1

    @property
    def dtype(self) -> jnp.dtype:
        return self.stacked.dtype

    def __getitem__(self, expert: jax.Array) -> jax.Array:
        return take(self.stacked, (self.layer, expert))

    def whole(self) -> jax.Array:
        """The layer's [E, ...] weights."""
        return take(self.stacked, (self.layer,))


# Attention.


def _scores(q, k, tau, q_positions, key_start, kv_lengths, scale, cap):
    """Capped, tempered, masked logits of queries q [B, T, K, G, H] against keys k [B, S, K, H]
    that sit at positions key_start .. key_start + S - 1; ``tau`` [B, T] the temperature.

    Returns (scores [B, K, G, T, S] float32, visible [B, 1, 1, T, S] bool).
    """
    s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    s = soft_cap(s * scale, cap)
    s = s * tau[:, None, None, :, None]
    key_pos = key_start + jnp.arange(k.shape[1])[None, None, :]  # [1, 1, S]
    visible = (key_pos <= q_positions[:, :, None]) & (key_pos < kv_lengths[:, None, None])
    visible = visible[:, None, None, :, :]  # [B, 1, 1, T, S]
    return jnp.where(visible, s, NEG_INF), visible


def attention_weights(
    q: jax.Array,
    k: jax.Array,
    tau: jax.Array,
    q_positions: jax.Array,
    kv_lengths: jax.Array,
    *,
    scale: float,
    cap: float | None,
) -> jax.Array:
    """Softmax attention probabilities.

    Args:
      q: [B, T, K, G, H] queries (RoPE applied).
      k: [B, S, K, H] keys (RoPE applied); key s sits at position s.
      tau: [B, T] float32 temperature of each query (``grok.attention.attention_temperature``).
      q_positions: [B, T] absolute positions of the queries.
      kv_lengths: [B] number of valid keys per sequence.
      scale, cap: the logits are ``cap * tanh(q . k * scale / cap) * tau`` (no cap: None).
    Returns:
      [B, K, G, T, S] float32 probabilities.
    """
    s, _ = _scores(q, k, tau, q_positions, 0, kv_lengths, scale, cap)  # [B, K, G, T, S]
    return jax.nn.softmax(s, axis=-1)


def _pad_axis1(x: jax.Array, size: int, mode: str = "constant") -> jax.Array:
    """Pads axis 1 of x up to ``size`` (zeros, or repeating the edge with mode="edge")."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, size - x.shape[1])
    return jnp.pad(x, pad, mode=mode)


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    tau: jax.Array,
    q_positions: jax.Array,
    kv_lengths: jax.Array,
    *,
    scale: float,
    cap: float | None,
    q_block: int,
    k_block: int,
) -> jax.Array:
    """Attention output in query blocks x key blocks with an online (running-max) softmax.

    Equal to ``softmax(scores) @ v`` up to float rounding; memory is O(T + S) plus one
    [B, K, G, q_block, k_block] block of scores. Each query block visits only the key blocks
    below its last position and below max(kv_lengths), so causal prefill does about half the
    work of the full score matrix.

    Args:
      q: [B, T, K, G, H] queries (RoPE applied).
      k, v: [B, S, K, H] keys (RoPE applied) and values; key s sits at position s.
      tau, q_positions: [B, T] temperatures and absolute positions of the queries.
      kv_lengths: [B] number of valid keys per sequence.
      scale, cap: as ``attention_weights``.
    Returns:
      [B, T, K, G, H] in v's dtype.
    """
    b, t, kh, g, h = q.shape
    s_len = k.shape[1]
    nq = -(-t // q_block)
    nk = -(-s_len // k_block)
    q = _pad_axis1(q, nq * q_block)  # [B, Tp, K, G, H]
    q_positions = _pad_axis1(q_positions, nq * q_block, mode="edge")  # [B, Tp]
    tau = _pad_axis1(tau, nq * q_block, mode="edge")  # [B, Tp]
    k = _pad_axis1(k, nk * k_block)  # [B, Sp, K, H]; padded keys sit at >= S >= kv_lengths
    v = _pad_axis1(v, nk * k_block)
    kv_end = jnp.max(kv_lengths)

    def one_query_block(i):
        qb = jax.lax.dynamic_slice_in_dim(q, i * q_block, q_block, axis=1)  # [B, Tq, K, G, H]
        pb = jax.lax.dynamic_slice_in_dim(q_positions, i * q_block, q_block, axis=1)  # [B, Tq]
        tb = jax.lax.dynamic_slice_in_dim(tau, i * q_block, q_block, axis=1)  # [B, Tq]
        # Key blocks past the block's last query position or past every length are all masked.
        last_key = jnp.minimum(jnp.max(pb) + 1, kv_end)
        n_visit = jnp.clip((last_key + k_block - 1) // k_block, 1, nk)

        def one_key_block(j, carry):
            m, l, acc = carry  # [B, K, G, Tq], [B, K, G, Tq], [B, K, G, Tq, H] float32
            kb = jax.lax.dynamic_slice_in_dim(k, j * k_block, k_block, axis=1)  # [B, Sk, K, H]
            vb = jax.lax.dynamic_slice_in_dim(v, j * k_block, k_block, axis=1)
            s, visible = _scores(qb, kb, tb, pb, j * k_block, kv_lengths, scale, cap)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))  # s: [B, K, G, Tq, Sk]
            p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)  # [B, K, G, Tq, Sk]
            correction = jnp.exp(m - m_new)
            l = l * correction + jnp.sum(p, axis=-1)
            pv = jnp.einsum(
                "BKGTS,BSKH->BKGTH", p.astype(v.dtype), vb, preferred_element_type=jnp.float32
            )
            return m_new, l, acc * correction[..., None] + pv

        init = (
            jnp.full((b, kh, g, q_block), NEG_INF, jnp.float32),
            jnp.zeros((b, kh, g, q_block), jnp.float32),
            jnp.zeros((b, kh, g, q_block, h), jnp.float32),
        )
        _, l, acc = jax.lax.fori_loop(0, n_visit, one_key_block, init)
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [B, K, G, Tq, H]
        return jnp.einsum("BKGTH->BTKGH", out).astype(v.dtype)

    out = jax.lax.map(one_query_block, jnp.arange(nq))  # [nq, B, Tq, K, G, H]
    out = jnp.moveaxis(out, 0, 1).reshape(b, nq * q_block, kh, g, h)
    return out[:, :t]  # [B, T, K, G, H]


def attention(
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    tau: jax.Array,
    positions: jax.Array,
    kv_lengths: jax.Array,
    *,
    scale: float,
    cap: float | None,
) -> jax.Array:
    """Attention output by XLA: the full score matrix, or ``blocked_attention`` past
    ``QUERY_BLOCK`` queries. Arguments as ``blocked_attention``; returns [B, T, K, G, H] in
    ``values``' dtype."""
    if q.shape[1] > QUERY_BLOCK:  # static: long prompts in blocks, linear memory
        blocks = dict(q_block=QUERY_BLOCK, k_block=KEY_BLOCK)
        return blocked_attention(
            q, keys, values, tau, positions, kv_lengths, scale=scale, cap=cap, **blocks
        )
    probs = attention_weights(q, keys, tau, positions, kv_lengths, scale=scale, cap=cap)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(values.dtype), values)  # [B,T,K,G,H]


def paged_rows(pool: jax.Array, layer: jax.Array, pages: jax.Array) -> jax.Array:
    """Layer ``layer`` of a page pool [L, M, Z, K, H] gathered through page tables ``pages``
    [B, W] into each row's positions in order: [B, W * Z, K, H] (an entry >= M reads page
    M - 1)."""
    b, w = pages.shape
    _, m, z, kh, h = pool.shape
    rows = pool[layer, jnp.clip(pages, 0, m - 1)]  # [B, W, Z, K, H]
    return rows.reshape(b, w * z, kh, h)


def paged_attention(
    q: jax.Array,
    k_pool: jax.Array,
    v_pool: jax.Array,
    layer: jax.Array,
    pages: jax.Array,
    tau: jax.Array,
    positions: jax.Array,
    kv_lengths: jax.Array,
    *,
    scale: float,
    cap: float | None,
) -> jax.Array:
    """``attention`` over layer ``layer`` of the pools k, v [L, M, Z, K, H], each row's keys
    gathered through its page table ``pages`` [B, W] (``paged_rows``): key s of row b is page
    ``pages[b, s // Z]``, offset ``s % Z``. Returns [B, T, K, G, H] in ``v_pool``'s dtype."""
    keys = paged_rows(k_pool, layer, pages)  # [B, S, K, H], S = W * Z
    values = paged_rows(v_pool, layer, pages)
    return attention(q, keys, values, tau, positions, kv_lengths, scale=scale, cap=cap)


def paged_write_layer(
    pool: jax.Array, layer: jax.Array, new: jax.Array, pages: jax.Array, start: jax.Array
) -> jax.Array:
    """Writes ``new`` [B, T, K, H] into layer ``layer`` of ``pool`` [L, M, Z, K, H] at positions
    start[b] .. + T of each row, through its page table ``pages`` [B, W]; positions without a
    page are dropped (``grok.kv_cache.page_slots``)."""
    _, m, z = pool.shape[:3]
    page, offset = page_slots(pages, start, new.shape[1], z, m)  # [B, T] each
    return pool.at[layer, page, offset].set(new.astype(pool.dtype), mode="drop")


def write_layer(cache_kv: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Writes ``new`` [B, T, K, H] into ``cache_kv`` [B, S, K, H] at slots start[b] .. + T."""

    def write_one(c, n, s):
        return jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (s, 0, 0))

    return jax.vmap(write_one)(cache_kv, new, start)


@dataclasses.dataclass(frozen=True)
class XlaKernels:
    """The model's operations as plain XLA (see ``grok.kernels.base.Kernels`` for each one's
    contract). Weights are plain arrays, ``QuantWeight``s, or ``LayerExperts``.

    Attributes:
      platform: the platform of the devices the program is compiled for ("cpu", "gpu",
        "tpu", ...), or None for no platform-specific choice.
    """

    platform: str | None = None

    # The layer loop.

    def loop_weights(self, params: dict) -> tuple[Any, Any]:
        return params, None  # scanned: the scan slices each layer's weights

    def weights_at(self, scanned: Any, fixed: Any, layer: jax.Array) -> dict:
        return scanned

    def layer_experts(self, w: jax.Array | QuantWeight, layer: jax.Array):
        if isinstance(w, QuantWeight):
            return QuantWeight(LayerExperts(w.q, layer), LayerExperts(w.scale, layer))
        return LayerExperts(w, layer)

    def dense(self, w):
        if isinstance(w, QuantWeight):
            return QuantWeight(self.dense(w.q), self.dense(w.scale))
        if isinstance(w, LayerExperts):
            return w.whole()
        return w

    def embed(self, table: jax.Array, ids: jax.Array) -> jax.Array:
        return table[ids]

    # Products.

    def project(
        self, equation: str, x: jax.Array, w: jax.Array, out_dtype: jnp.dtype | None = None
    ) -> jax.Array:
        inputs, out_letters = equation.split("->")
        x_letters, w_letters = inputs.split(",")
        rows = math.prod(n for n, c in zip(x.shape, x_letters, strict=True) if c in out_letters)
        pad = (
            self.platform == "cpu"
            and rows < MIN_CPU_ROWS
            and x.dtype != jnp.float32
            and x.shape[0] == rows
        )
        if pad:
            x = jnp.concatenate([x, jnp.zeros((MIN_CPU_ROWS - rows, *x.shape[1:]), x.dtype)])
        if isinstance(w, QuantWeight) and w.row_blocks:  # no scale per output: dequantised
            w = dequant(w, x.dtype)
        if isinstance(w, QuantWeight):  # the stored values times the scale of each output
            y = jnp.einsum(equation, x, w.q.astype(x.dtype), preferred_element_type=jnp.float32)
            y = y * output_scale(w.scale, w_letters, out_letters)
        else:
            y = jnp.einsum(equation, x, w, preferred_element_type=jnp.float32)
        if pad:
            y = jax.lax.slice_in_dim(y, 0, rows, axis=out_letters.index(x_letters[0]))
        return y.astype(out_dtype or x.dtype)

    def grouped(
        self,
        xs: jax.Array,
        w: jax.Array | QuantWeight | LayerExperts,
        sizes: jax.Array,
        row_group: jax.Array,
        in_axis: int,
    ) -> jax.Array:
        w = self.dense(w)
        numbers = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(([1], [in_axis]), ([], [])),
            lhs_ragged_dimensions=[0],
            rhs_group_dimensions=[0],
        )
        # A quantised weight is multiplied as stored (cast to the activations' dtype) and its
        # per-output-channel scale (1 on the In axis) applied to each row's output afterwards
        # (the same product, without a dequantised copy in float32).
        if isinstance(w, QuantWeight) and w.row_blocks:
            w = dequant(w, xs.dtype)
        q = w.q if isinstance(w, QuantWeight) else w
        y = jax.lax.ragged_dot_general(
            xs, q.astype(xs.dtype), sizes, numbers, preferred_element_type=jnp.float32
        )  # [A, Out]
        if isinstance(w, QuantWeight):  # scale per row's group: [A, Out]
            y = y * jnp.squeeze(w.scale[row_group], axis=in_axis)
        return y

    def expert_mlp(self, xs, w1, w3, w2, sizes, row_group, gate) -> jax.Array:
        def grouped(rows: jax.Array, w) -> jax.Array:  # [A, In] -> [A, Out] in xs' dtype
            return self.grouped(rows, w, sizes, row_group, EXPERT_IN_AXIS).astype(xs.dtype)

        h = gate(grouped(xs, w1), grouped(xs, w3))  # [A, Fe]
        return grouped(h, w2)  # [A, D]

    def expert_path(self, tokens: int, assignments: int, experts: int) -> str:
        # Up to E assignments, gathering reads each chosen expert about once; beyond that the
        # block path reads each used expert once per block (ragged_dot on accelerators).
        return "gather" if assignments <= experts else prefill_impl(self.platform)

    # Attention and the KV cache.

    def attend(self, q, keys, values, tau, positions, lengths, *, scale, cap) -> jax.Array:
        return attention(q, keys, values, tau, positions, lengths, scale=scale, cap=cap)

    def cache_write(
        self, cache: LayerCache, k: jax.Array, v: jax.Array, start: jax.Array
    ) -> tuple[LayerCache, jax.Array, jax.Array]:
        def put(whole: jax.Array, new: jax.Array) -> tuple[jax.Array, jax.Array]:
            layer = jax.lax.dynamic_index_in_dim(whole, cache.layer, keepdims=False)
            layer = write_layer(layer, new, start)  # [B, S, K, H]
            return jax.lax.dynamic_update_index_in_dim(whole, layer, cache.layer, 0), layer

        (k_all, keys), (v_all, values) = put(cache.k, k), put(cache.v, v)
        return dataclasses.replace(cache, k=k_all, v=v_all), keys, values

    def paged_write(
        self, cache: LayerCache, k: jax.Array, v: jax.Array, start: jax.Array
    ) -> LayerCache:
        k_all = paged_write_layer(cache.k, cache.layer, k, cache.pages, start)
        v_all = paged_write_layer(cache.v, cache.layer, v, cache.pages, start)
        return dataclasses.replace(cache, k=k_all, v=v_all)

    def paged_attend(self, q, cache, tau, positions, lengths, *, scale, cap) -> jax.Array:
        pools = (cache.k, cache.v, cache.layer, cache.pages)
        return paged_attention(q, *pools, tau, positions, lengths, scale=scale, cap=cap)

    def paged_width(self, pages: int, most: int, page_size: int) -> int:
        # Every entry is gathered: the smallest power of two that holds the pages (a few
        # compiled widths, each read in full).
        return min(most, 1 << max(0, pages - 1).bit_length())

    def carry(self, cache: KVCache | PagedKVCache) -> KVCache | PagedKVCache:
        return cache

    def uncarry(self, cache: KVCache | PagedKVCache, dtype: jnp.dtype) -> KVCache | PagedKVCache:
        return cache


REFERENCE = XlaKernels()  # no platform-specific choice: standalone use and tests
