"""The KV cache as the decode core (``grok.decode``) reaches it: the ``CacheStore`` protocol
and its two layouts, ``DenseCache`` (every row its own slots) and ``PagedCache`` (a pool of
pages shared by every row, a page table per row).

Glossary: L layers, B rows, S cache slots per row, K kv heads, H head dim; M pages of Z tokens
in a paged pool, W page-table entries per row.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from grok.config import GrokConfig
from grok.kernels import REFERENCE, Kernels
from grok.kv_cache import KVCache, PagedKVCache


class CacheStore(Protocol):
    """Everything the core does to the KV cache, so that another layout can slot in.

    A store is hashable (a static argument of the compiled programs). The model reads and
    writes the cache it is handed (``ApplyFn``: token t of row b at position p goes where
    the cache puts position p of row b); the store makes empty caches for a prefill, turns a
    cache into the form carried between steps and back, and puts prefilled rows into a
    running batch's cache. ``DenseCache`` copies slots; ``PagedCache`` (pages shared by all
    rows, a page table per row) prefills straight into the shared pool, and its ``insert``
    writes page-table rows.
    """

    def empty(self, batch: int, slots: int) -> KVCache | PagedKVCache:
        """A cache for ``batch`` new sequences of up to ``slots`` tokens, in the model's form."""
        ...

    def carry(self, cache: KVCache) -> Any:
        """The form a loop or a server's state holds between steps."""
        ...

    def uncarry(self, carried: Any) -> KVCache:
        """Undoes ``carry``: the form the model reads."""
        ...

    def insert(self, carried: Any, fresh: Any, rows: jax.Array) -> Any:
        """``fresh`` (carried, n rows, from ``prefill``) into rows ``rows`` [n] of
        ``carried``; rows >= B are dropped."""
        ...


@dataclasses.dataclass(frozen=True)
class DenseCache:
    """The dense KV cache (``grok.kv_cache.KVCache``): row b's token at position s sits in
    slot s of row b, k/v [L, B, S, K, H].

    Attributes:
      config: the model's config (L, K, H).
      dtype: the cache's dtype (the model's).
      sharding: where k/v [L, B, S, K, H] of an empty cache go on a mesh (laid out like the
        model's K heads), or None (left to the compiler).
      kernels: the model's kernels (``grok.kernels.Kernels``), whose carried form of the
        cache (``Kernels.carry``) the decode loop holds between steps.
    """

    config: GrokConfig
    dtype: jnp.dtype
    sharding: jax.sharding.Sharding | None = None
    kernels: Kernels = REFERENCE

    def empty(self, batch: int, slots: int) -> KVCache:
        cache = KVCache.create(self.config, batch, slots, self.dtype)
        if self.sharding is None:
            return cache
        k, v = (jax.lax.with_sharding_constraint(x, self.sharding) for x in (cache.k, cache.v))
        return KVCache(k=k, v=v, lengths=cache.lengths)

    # The carried form is the kernels' (``Kernels.carry``; on the native CPU path the cache's
    # uint16 bits): ``uncarry`` at a step's start and ``carry`` at its end cancel out inside
    # the compiled step. These two are the decode path's only conversions of the cache.
    def carry(self, cache: KVCache) -> KVCache:
        return self.kernels.carry(cache)

    def uncarry(self, carried: KVCache) -> KVCache:
        return self.kernels.uncarry(carried, self.dtype)

    def insert(self, carried: KVCache, fresh: KVCache, rows: jax.Array) -> KVCache:
        t = fresh.max_len
        return KVCache(
            k=carried.k.at[:, rows, :t].set(fresh.k, mode="drop"),
            v=carried.v.at[:, rows, :t].set(fresh.v, mode="drop"),
            lengths=set_rows(carried.lengths, rows, fresh.lengths),
        )


@dataclasses.dataclass(frozen=True)
class PagedCache:
    """The paged KV cache (``grok.kv_cache.PagedKVCache``): a pool of pages of ``page_size``
    tokens shared by every row, k/v [L, M, Z, K, H], and a page table per row [B, W]; the
    model writes and reads through the tables (``Kernels.paged_write``, ``paged_attend``).

    Who gives a row its pages is the caller's: ``empty`` gives each row pages of its own
    (``generate``-style use); a server allocates pages as sequences grow, shares the pages of
    a common prompt prefix, and attaches the rows' tables to the pool for each call
    (``pool`` makes one without tables).

    Attributes:
      config: the model's config (L, K, H).
      dtype: the cache's dtype (the model's).
      page_size: Z, tokens per page.
      sharding: where k/v [L, M, Z, K, H] go on a mesh (K over the model axis), or None.
      kernels: the model's kernels, whose carried form of the cache the loop holds.
    """

    config: GrokConfig
    dtype: jnp.dtype
    page_size: int = 16
    sharding: jax.sharding.Sharding | None = None
    kernels: Kernels = REFERENCE

    def pool(self, num_pages: int) -> PagedKVCache:
        """An empty pool of ``num_pages`` pages, no tables attached."""
        cache = PagedKVCache.create(self.config, num_pages, self.page_size, self.dtype)
        if self.sharding is None:
            return cache
        k, v = (jax.lax.with_sharding_constraint(x, self.sharding) for x in (cache.k, cache.v))
        return PagedKVCache(k=k, v=v)

    def empty(self, batch: int, slots: int) -> PagedKVCache:
        """A pool with ``ceil(slots / Z)`` pages for each of ``batch`` rows, row b's table the
        pages b * W .. (b + 1) * W - 1."""
        width = -(-slots // self.page_size)  # W
        pool = self.pool(batch * width)
        pages = jnp.arange(batch * width, dtype=jnp.int32).reshape(batch, width)  # [B, W]
        return dataclasses.replace(pool, pages=pages, lengths=jnp.zeros((batch,), jnp.int32))

    def carry(self, cache: PagedKVCache) -> PagedKVCache:
        return self.kernels.carry(cache)

    def uncarry(self, carried: PagedKVCache) -> PagedKVCache:
        return self.kernels.uncarry(carried, self.dtype)

    def insert(self, carried: PagedKVCache, fresh: PagedKVCache, rows: jax.Array) -> PagedKVCache:
        """The prefill wrote ``fresh``'s rows into the pool itself: its pool replaces
        ``carried``'s, and its rows' tables and lengths go into rows ``rows`` of ``carried``'s
        (where ``carried`` holds tables; a caller that holds them keeps its own)."""
        if carried.pages is None:
            return dataclasses.replace(fresh, pages=None, lengths=None)
        return dataclasses.replace(
            fresh,
            pages=set_rows(carried.pages, rows, fresh.pages),
            lengths=set_rows(carried.lengths, rows, fresh.lengths),
        )


def set_rows(array: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
    """array[rows] = values along axis 0; rows >= B (padding) are dropped."""
    return array.at[rows].set(values.astype(array.dtype), mode="drop")


__all__ = ["CacheStore", "DenseCache", "PagedCache", "set_rows"]
