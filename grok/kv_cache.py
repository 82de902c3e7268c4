"""The KV cache: an explicit pytree passed into the model and returned by it.

It holds the K kv heads only (never the N repeated query heads), for every layer, and the
number of valid tokens per sequence, in one of two layouts:

- ``KVCache`` (dense): slot ``s`` of sequence ``b`` holds the keys and values of that
  sequence's token at position ``s``; every sequence owns S slots.
- ``PagedKVCache``: a pool of M pages of Z tokens shared by all sequences, and a page table
  per sequence: position ``p`` of sequence ``b`` sits in page ``pages[b, p // Z]`` at offset
  ``p % Z`` (``page_slots``). A server gives a sequence pages as it grows, frees them when it
  ends, and shares full pages of a common prompt prefix between sequences.

Glossary: L layers, B sequences, S slots (positions) per sequence, K kv heads, H head dim,
M pages in the pool, Z tokens per page, W page-table entries per sequence (S = W * Z).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from grok.config import GrokConfig


def _zero_keys_values(
    config: GrokConfig, rows: int, slots: int, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """Zero keys and values [L, rows, slots, K, H]: a dense cache's [L, B, S, K, H] or a page
    pool's [L, M, Z, K, H]."""
    shape = (config.num_hidden_layers, rows, slots, config.num_key_value_heads, config.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer.

    Attributes:
      k: [L, B, S, K, H] keys (RoPE applied).
      v: [L, B, S, K, H] values.
      lengths: [B] int32, the number of valid slots of each sequence.
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @classmethod
    def create(
        cls, config: GrokConfig, batch_size: int, max_len: int, dtype: jnp.dtype = jnp.bfloat16
    ) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_len`` tokens."""
        k, v = _zero_keys_values(config, batch_size, max_len, dtype)
        return cls(k=k, v=v, lengths=jnp.zeros((batch_size,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.lengths.nbytes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's place in the whole cache (dense or paged), as the layer loop carries it.

    The loop carries the whole cache and hands each layer this view, so a step writes its new
    keys and values where they lie (``Kernels.cache_write``) instead of the loop slicing every
    layer's cache out of the stack and stacking the results back.

    Attributes:
      k, v: [L, B, S, K, H] keys and values (a paged pool: [L, M, Z, K, H]), in the form
        the kernels carry them
        (``Kernels.carry``: a 16-bit cache may be held as its uint16 bits).
      layer: () int32, this layer.
      dtype: the cache's own dtype.
      pages: i32 [B, W] page tables when k and v are a ``PagedKVCache``'s pool
        [L, M, Z, K, H] (``Kernels.paged_write`` and ``paged_attend`` read and write it),
        else None.
    """

    k: jax.Array
    v: jax.Array
    layer: jax.Array
    dtype: jnp.dtype = dataclasses.field(metadata=dict(static=True))
    pages: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """Keys and values of every layer in a pool of pages, read and written through page
    tables.

    Attributes:
      k: [L, M, Z, K, H] keys (RoPE applied), page by page.
      v: [L, M, Z, K, H] values.
      pages: i32 [B, W], each sequence's page table (see ``page_slots``), or None where the
        caller holds the tables and attaches them for each call (a server).
      lengths: i32 [B], the number of valid positions of each sequence, or None with ``pages``.
    """

    k: jax.Array
    v: jax.Array
    pages: jax.Array | None = None
    lengths: jax.Array | None = None

    @classmethod
    def create(
        cls, config: GrokConfig, num_pages: int, page_size: int, dtype: jnp.dtype = jnp.bfloat16
    ) -> PagedKVCache:
        """An empty pool of ``num_pages`` pages of ``page_size`` tokens, no tables attached."""
        k, v = _zero_keys_values(config, num_pages, page_size, dtype)
        return cls(k=k, v=v)

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def page_slots(
    pages: jax.Array, start: jax.Array, count: int, page_size: int, num_pages: int
) -> tuple[jax.Array, jax.Array]:
    """Where positions start[b] .. start[b] + count - 1 of each sequence sit: (page, offset),
    each i32 [B, count], for page tables ``pages`` [B, W] over a pool of ``num_pages`` pages of
    ``page_size`` tokens. A position past the table (p // Z >= W) gets page ``num_pages``,
    like a table entry that holds no page (>= M): a write there is dropped."""
    positions = start[:, None] + jnp.arange(count, dtype=jnp.int32)[None, :]  # [B, T]
    index = positions // page_size  # [B, T]
    width = pages.shape[1]
    page = jnp.take_along_axis(pages, jnp.minimum(index, width - 1), axis=1)  # [B, T]
    page = jnp.where(index < width, page, num_pages)
    return jnp.minimum(page, num_pages).astype(jnp.int32), positions % page_size
