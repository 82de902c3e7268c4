"""How the loader asks for the memory its shards are read into, and how it fills it.

On the CPU backend every loaded array is a shard buffer adopted as it is, so a load can go no
faster than new memory can be filled: the kernel must find, zero and map a page for every page
the copies first touch, and in a virtual machine the host may have to back it first.

Measured on this project's 2-core VM (KVM, 2026-12-06; 2 GiB copied from memory into new
memory by 2 threads in 8 MiB units, each way in a fresh process, alternating, 3-4 tries each,
load average 3-4 from other work; ``scripts/bench_load.py`` reports the same ways beside every
load):

===============================================  =================================
4 KiB pages (``MADV_NOHUGEPAGE``), copy faults   2.2-3.0 GB/s
4 KiB pages, each unit populated first           2.7-3.2 GB/s
huge pages (``MADV_HUGEPAGE``), copy faults      0.4-1.9 GB/s
huge pages, each unit populated first            0.5-4.0 GB/s (bimodal)
numpy's own (``np.empty``: huge pages)           0.5-3.6 GB/s
===============================================  =================================

A whole bf16 load (1.93 GB, one device, 4 tries each, alternating): 4 KiB pages 1.9-2.0 GB/s,
populated first 2.0-2.1 GB/s; huge pages populated first 2.7-2.9 GB/s where the process before
it had just freed huge pages, 0.4 GB/s where it had not; a variant that starts with huge pages
and gives them up when populating them goes slowly measured 0.9-2.7.

Huge pages are fast only where the guest has 2 MiB blocks at hand that the host still backs:
this VM hands free memory back to its host (virtio-balloon free page reporting, in 8 MiB
blocks), and taking such blocks again made every huge page a host fault, where 4 KiB pages
mostly come from memory freed a moment ago and still backed. So the loader takes 4 KiB pages,
never the slow mode, and populates each copy unit's span from its copy thread before the copy
writes it (``MADV_POPULATE_WRITE``: the faults in one system call instead of a trap per page).
Reusing freed pages does not apply on the CPU backend: every buffer becomes an array.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap

import numpy as np

HUGE_PAGES = False  # the measured choice (see above)
MADV_POPULATE_WRITE = 23  # Linux 5.14+; older kernels say EINVAL and the copy faults instead
PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


def aligned_empty(
    shape: tuple[int, ...], dtype: np.dtype, *, huge: bool = HUGE_PAGES
) -> np.ndarray:
    """An uninitialised C-order array on new page-aligned memory (the CPU backend adopts
    buffers aligned to 64 bytes without a copy), with transparent huge pages asked for or
    refused (``huge``)."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    memory = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE" if huge else "MADV_NOHUGEPAGE", None)  # Linux
    if advice is not None:
        memory.madvise(advice)
    return np.frombuffer(memory, np.uint8, nbytes).view(dtype).reshape(shape)


def populate(region: np.ndarray) -> None:
    """Faults in the pages under ``region`` (a view of an ``aligned_empty`` buffer, any
    strides: the span from its first to its last byte) for writing, in one system call.
    Nothing where the kernel cannot (the copy then faults the pages in as it writes them)."""
    if region.size == 0:
        return
    lo, hi = np.lib.array_utils.byte_bounds(region)
    start = lo - lo % PAGE
    _libc.madvise(start, hi - start, MADV_POPULATE_WRITE)
