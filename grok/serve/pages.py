"""The KV cache's pages on the host: which pages of the pool are free, who holds each, and the
prefix cache.

The device holds the pool (``grok.kv_cache.PagedKVCache``); this module only does the
bookkeeping: a sequence holds a list of pages (its page table, in position order), takes more
as it grows and gives them back when it ends. A page is reference-counted: several sequences
that share a prompt prefix hold the same full pages.

The prefix cache: each full page of a prompt has a content hash, the chain hash of its tokens
and every token before it (``chain_hashes``), so equal hashes mean equal prefixes. A page is
published under its hash once its keys and values are written (``publish``); a new sequence
looks its prompt's hashes up (``match``) and holds the pages it finds instead of computing
them again. When a published page's last holder lets it go, it stays cached but idle; idle
pages are evicted least recently used first when the pool has no free page left.

Hashed with ``hashlib.blake2b`` (16-byte digests) rather than Python's ``hash``: a collision
would hand a sequence another prompt's keys, so the index keeps a cryptographic digest (as
vLLM's hash-based prefix caching does), and never compares token lists.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import numpy as np

from grok.errors import GenerationError

DIGEST_BYTES = 16  # 128-bit chain hashes: collisions out of reach


def chain_hashes(tokens: Sequence[int], page_size: int, parent: bytes = b"") -> list[bytes]:
    """The hash of each full page of ``tokens``: page i's is blake2b(page i-1's hash, the
    page's token ids as little-endian int32); the first page's parent is ``parent``."""
    out: list[bytes] = []
    ids = np.asarray(tokens, dtype="<i4")
    for i in range(len(ids) // page_size):
        h = hashlib.blake2b(parent, digest_size=DIGEST_BYTES)
        h.update(ids[i * page_size : (i + 1) * page_size].tobytes())
        parent = h.digest()
        out.append(parent)
    return out


class PagePool:
    """Pages 0 .. M - 1 of the device's pool: free, held (reference-counted) or cached idle.

    Attributes:
      num_pages: M.
      page_size: Z, tokens per page.
      prefix_cache: whether pages are published and matched (off: ``match`` finds nothing).
    """

    def __init__(self, num_pages: int, page_size: int, *, prefix_cache: bool = True):
        if num_pages < 1 or page_size < 1:
            raise GenerationError(f"a page pool needs pages, got {num_pages} of {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.prefix_cache = prefix_cache
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: low page ids first
        self._refs = [0] * num_pages
        self._page_of: dict[bytes, int] = {}  # hash -> the page published under it
        self._hash_of: dict[int, bytes] = {}
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first

    @property
    def available(self) -> int:
        """Pages a sequence may take now: free ones and cached idle ones (evicted for it)."""
        return len(self._free) + len(self._idle)

    @property
    def held(self) -> int:
        """Pages some sequence holds."""
        return self.num_pages - self.available

    @property
    def cached(self) -> int:
        """Pages published in the prefix cache (held or idle)."""
        return len(self._hash_of)

    def pages_for(self, tokens: int) -> int:
        """Pages that hold ``tokens`` positions."""
        return -(-tokens // self.page_size)

    def take(self, n: int) -> list[int]:
        """``n`` pages, each held once: free ones first, then idle cached ones, least recently
        used first (their hashes forgotten). GenerationError if fewer are ``available``."""
        if n > self.available:
            raise GenerationError(f"{n} KV pages asked for, {self.available} available")
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._idle.popitem(last=False)
                del self._page_of[self._hash_of.pop(page)]
            self._refs[page] = 1
            pages.append(page)
        return pages

    def release(self, pages: Sequence[int]) -> None:
        """Lets go of ``pages`` (one hold each). A page nobody holds becomes free, or idle in
        the prefix cache if published; the last pages go idle first (evicted before the
        prefix pages before them, so a prefix stays matchable longest)."""
        for page in reversed(pages):
            if self._refs[page] <= 0:
                raise GenerationError(f"KV page {page} released but not held")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._hash_of:
                    self._idle[page] = None
                else:
                    self._free.append(page)

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """The pages published under the leading ``hashes`` (up to the first not cached), each
        now held once more."""
        if not self.prefix_cache:
            return []
        pages = []
        for h in hashes:
            page = self._page_of.get(h)
            if page is None:
                break
            if self._refs[page] == 0:
                del self._idle[page]
            self._refs[page] += 1
            pages.append(page)
        return pages

    def publish(self, hashes: Sequence[bytes], pages: Sequence[int]) -> None:
        """Publishes full pages whose keys and values are written: ``pages[i]`` holds the page
        hashed ``hashes[i]``. A hash already published (the same prefix computed twice) keeps
        its first page."""
        if not self.prefix_cache:
            return
        for h, page in zip(hashes, pages, strict=True):
            if h not in self._page_of and page not in self._hash_of:
                self._page_of[h] = page
                self._hash_of[page] = h


__all__ = ["DIGEST_BYTES", "PagePool", "chain_hashes"]
