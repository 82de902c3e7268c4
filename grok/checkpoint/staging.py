"""Host buffers and the pipelined shard reads: how copied bytes become device arrays.

Each parameter is built device shard by device shard. A shard is one host buffer filled by
its copy units (``grok.checkpoint.units``) on a thread pool; the next shard's units are
queued before a finished shard is placed on its device(s), so the pool never idles at a
shard's tail (``Pipeline.read``). On the CPU backend ``device_put`` adopts a page-aligned
buffer without a copy, so each shard is read into new memory that becomes the array; on an
accelerator shards are read into one or two reused host buffers, the next read overlapping
the last transfer, so the host holds at most two device shards beyond the arrays
(``HostBuffers``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from grok.checkpoint.finite import non_finite_error
from grok.checkpoint.fresh import aligned_empty
from grok.checkpoint.plan import LoadPlan, Shard
from grok.checkpoint.units import Copier, CopyUnit

# The second host buffer (reads overlapping transfers) is kept only where the largest shard
# is at most this fraction of the checkpoint: the host-memory target of a load.
SECOND_BUFFER_FRACTION = 0.05


def stages_on_host(device: jax.Device) -> bool:
    """Whether shards bound for ``device`` are copied to it out of reused host buffers.

    Everywhere but the CPU backend, which adopts each (page-aligned) shard buffer as the
    device array without a copy: there the buffer is the loaded array and must be new memory.
    """
    return device.platform != "cpu"


class HostBuffers:
    """Where shards are read on the host before ``device_put``.

    ``staged=False`` (CPU backend): every shard gets fresh page-aligned memory, adopted as
    the device array, so no memory is held beyond the arrays; ``window`` 2 only lets the
    next shard's copies start before this one is placed.

    ``staged=True`` (accelerators): a ring of ``count`` buffers, reused for the whole load,
    so reads run at page-cache copy speed instead of paying fresh memory's page faults, and
    host memory stays at ``count`` x the largest shard. A slot is handed out again only once
    the arrays last placed from it are ready: their transfer has finished reading it. With
    two slots the next shard's reads overlap this shard's transfer. An array placed from a
    slot is deleted through ``delete``, which waits for its transfer first (a deleted array
    can no longer be waited on).
    """

    def __init__(self, staged: bool, count: int = 2):
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.staged = staged
        self.window = count if staged else 2
        self._memory: list[np.ndarray | None] = [None] * count
        self._in_flight: list[list[jax.Array]] = [[] for _ in range(count)]
        self._next = 0

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, int | None]:
        """An uninitialised ``shape`` array to read a shard into, and its ring slot."""
        if not self.staged:
            return aligned_empty(shape, dtype), None
        slot, self._next = self._next, (self._next + 1) % len(self._memory)
        _wait(self._in_flight[slot])  # its last transfer has read it
        self._in_flight[slot] = []
        nbytes = math.prod(shape) * dtype.itemsize
        memory = self._memory[slot]
        if memory is None or memory.nbytes < nbytes:
            self._memory[slot] = None  # the old one freed before the new one is touched
            memory = self._memory[slot] = aligned_empty((nbytes,), np.dtype(np.uint8))
        return memory[:nbytes].view(dtype).reshape(shape), slot

    def place(
        self, buffer: np.ndarray, slot: int | None, devices: Sequence[jax.Device]
    ) -> list[jax.Array]:
        """``buffer`` on each of ``devices``; a staged slot is busy until they are ready."""
        if slot is None:
            return [jax.device_put(buffer, d) for d in devices]
        # may_alias=False: a reused buffer must never be an array's memory. (XLA:CPU aliases
        # a numpy buffer even so, jax-ml/jax#37830: one reason the CPU never stages.) Off the
        # CPU, PJRT reads the host buffer until the transfer completes, hence ``take``'s wait.
        placed = [jax.device_put(buffer, d, may_alias=False) for d in devices]
        self._in_flight[slot] = placed
        return placed

    def delete(self, array: jax.Array) -> None:
        """Deletes ``array`` (built from ``place``'s arrays) once no transfer reads for it."""
        if self.staged:
            array.block_until_ready()
        array.delete()

    def drain(self) -> None:
        """Waits for every transfer still reading a staged buffer."""
        for arrays in self._in_flight:
            _wait(arrays)
        self._in_flight = [[] for _ in self._in_flight]


def _wait(arrays: list[jax.Array]) -> None:
    """Blocks until ``arrays`` are ready; deleted ones were waited for by ``delete`` (or
    deleted on an error, after which no buffer is reused)."""
    jax.block_until_ready([a for a in arrays if not a.is_deleted()])


def host_buffers(plan: LoadPlan, checkpoint_bytes: int) -> HostBuffers:
    """The load's ``HostBuffers``: staged off the CPU backend, with a second slot (reads
    overlapping transfers) only where the largest shard is within ``SECOND_BUFFER_FRACTION``
    of the checkpoint's bytes."""
    if not stages_on_host(plan.device):
        return HostBuffers(staged=False)
    fits = plan.largest_buffer_bytes <= SECOND_BUFFER_FRACTION * checkpoint_bytes
    return HostBuffers(staged=True, count=2 if fits else 1)


@dataclasses.dataclass
class _Pending:
    """One device shard being read: its buffer, ring slot, devices and copy jobs."""

    buffer: np.ndarray
    slot: int | None
    devices: Sequence[jax.Device]
    futures: list[concurrent.futures.Future]


class Pipeline:
    """One load's shard reads: copy units on ``pool``, buffers from ``buffers``, placed."""

    def __init__(self, copier: Copier, buffers: HostBuffers, pool: ThreadPoolExecutor):
        self.copier = copier
        self.buffers = buffers
        self.pool = pool

    def read(
        self,
        shape: tuple[int, ...],
        sharding: jax.sharding.Sharding,
        shards: Sequence[Shard],
        dtype: np.dtype,
        units_for: Callable[[Shard], list[CopyUnit]],
        on_bytes: Callable[[int], None] | None = None,
    ) -> jax.Array:
        """The array ``shape`` on ``sharding`` from this process's ``shards``, read as ``dtype``.

        Pipelined: the next shard's copy units are queued before the previous shard is
        placed, so the pool never idles at a shard's tail, and (accelerators) a shard's
        transfer overlaps the next one's reads. On any error no copy is left writing and the
        arrays placed so far are deleted.
        """
        arrays: list[jax.Array] = []
        pending: collections.deque[_Pending] = collections.deque()
        try:
            for shard in shards:
                if len(pending) == self.buffers.window:
                    arrays += self._place(pending[0], on_bytes)
                    pending.popleft()  # only once placed: a failure cancels its copies too
                buffer, slot = self.buffers.take(shard.shape, dtype)
                futures = [self.pool.submit(self.copier.run, u, buffer) for u in units_for(shard)]
                pending.append(_Pending(buffer, slot, shard.devices, futures))
            while pending:
                arrays += self._place(pending[0], on_bytes)
                pending.popleft()
        except BaseException:
            # No copy may still be writing into a buffer that is reused or freed.
            futures = [f for shard in pending for f in shard.futures]
            for future in futures:
                future.cancel()
            concurrent.futures.wait(futures)
            for array in arrays:
                array.delete()
            raise
        return jax.make_array_from_single_device_arrays(shape, sharding, arrays)

    def _place(self, shard: _Pending, on_bytes: Callable[[int], None] | None) -> list[jax.Array]:
        """Waits for ``shard``'s copies, then puts its buffer on its devices."""
        for future in shard.futures:
            future.result()
        if self.copier.non_finite:
            raise non_finite_error(self.copier.files.directory, self.copier.non_finite)
        if on_bytes is not None:
            on_bytes(shard.buffer.nbytes)
        return self.buffers.place(shard.buffer, shard.slot, shard.devices)
