"""Which sequences run, and where their keys and values go: the server's decode slots, the KV
pages each sequence holds, prompts prefilled in chunks, and preemption.

Glossary: B slots (``max_batch``), Z tokens per page, W page-table width of a whole context
(``ceil(max_context / Z)``), n rows of a prefill call, T its bucket length.

A sequence is admitted into a free slot when the pool has pages for its prompt (admission by
pages, not by slots alone; pages found in the prefix cache cost nothing). Its prompt is then
prefilled a chunk at a time, at most ``chunk`` tokens per engine step for all prompts
together, between the running sequences' decode steps, so a long prompt never stops the
streams for longer than one chunk. While it decodes it takes a page whenever its next position
starts one. When the pool has no page left for that, the sequence admitted last is preempted:
its pages go back to the pool and it waits again at the head of the queue, to be prefilled
again (its prompt and the tokens drawn so far, most of it from the prefix cache when its pages
were not reused) and to go on drawing where it stopped.

Everything here runs on the engine thread, on the host; ``grok.serve.batch`` turns a plan into
the compiled calls' inputs.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from grok.decode import bucket_length
from grok.serve.pages import PagePool, chain_hashes


@dataclasses.dataclass(eq=False)
class Run:
    """An admitted sequence and the cache it holds.

    Attributes:
      seq: the engine's sequence (opaque here).
      slot: its decode slot (row of the batch).
      tokens: the positions to prefill: its prompt, and after a preemption the tokens it had
        drawn.
      prompt_len: how many of ``tokens`` are the prompt (the rest were drawn: they count for
        the penalties).
      whole: prefilled in one piece, never from the prefix cache (the prompt's logprobs need
        every position's logits).
      pages: its page table, in position order.
      hashes: the chain hashes of ``tokens``' full pages (empty without the prefix cache).
      cached: positions whose keys and values are written, or in a call already dispatched.
      order: admission order (the last admitted is preempted first).
      started: whether a chunk of it has run (the slot's sampler data is then its own).
    """

    seq: Any
    slot: int
    tokens: list[int]
    prompt_len: int
    whole: bool
    pages: list[int]
    hashes: list[bytes]
    cached: int
    order: int
    started: bool = False

    @property
    def prefilled(self) -> bool:
        """Whether every token is in the cache: the sequence decodes."""
        return self.cached >= len(self.tokens)

    @property
    def drawn(self) -> int:
        """Tokens drawn before this admission (the next draw's index)."""
        return len(self.tokens) - self.prompt_len


class Scheduler:
    """The slots' runs and the pool's pages (see the module's docstring).

    Attributes:
      pool: the host's view of the pages (``PagePool``).
      runs: the run in each of the B slots, or None.
      chunk: the most prompt tokens (padding included) one engine step prefills.
      context: the most positions of one sequence.
    """

    def __init__(self, pool: PagePool, *, slots: int, chunk: int, context: int):
        self.pool = pool
        self.runs: list[Run | None] = [None] * slots
        self.chunk = chunk
        self.context = context
        self._order = itertools.count()

    @property
    def width(self) -> int:
        """W: the page-table width of a whole context."""
        return self.pool.pages_for(self.context)

    def free_slots(self) -> int:
        return sum(r is None for r in self.runs)

    def admit(self, seq: Any, tokens: list[int], prompt_len: int, *, whole: bool) -> Run | None:
        """Admits ``seq`` (to prefill ``tokens``) into a free slot if the pool has the pages
        its tokens need beyond those the prefix cache holds (the run's ``cached`` positions);
        None when not now."""
        slot = next((i for i, r in enumerate(self.runs) if r is None), None)
        if slot is None:
            return None
        pool = self.pool
        hashes = [] if whole or not pool.prefix_cache else chain_hashes(tokens, pool.page_size)
        # The last token is always computed (its logits draw the next one), and drawn tokens
        # come from the prefill's rows (their penalty counts are made there).
        usable = min(len(tokens) - 1, prompt_len) // pool.page_size
        shared = pool.match(hashes[:usable])
        need = pool.pages_for(len(tokens)) - len(shared)
        if need > pool.available:
            pool.release(shared)
            return None
        pages = shared + pool.take(need)
        cached = len(shared) * pool.page_size
        run = Run(seq, slot, tokens, prompt_len, whole, pages, hashes, cached, next(self._order))
        self.runs[slot] = run
        return run

    def plan(self) -> list[tuple[Run, int]]:
        """This step's prefill: (run, tokens) pieces, oldest admitted first, within the
        budget: n rows (rounded up to a power of two) of T tokens (bucketed) make at most
        ``chunk`` tokens, one row at least. A run prefilled whole goes alone."""
        waiting = sorted((r for r in self.runs if r is not None and not r.prefilled), key=_order)
        if not waiting:
            return []
        if waiting[0].whole:
            run = waiting[0]
            return [(run, len(run.tokens) - run.cached)]
        plan: list[tuple[Run, int]] = []
        budget = self.chunk
        for run in waiting:
            count = min(len(run.tokens) - run.cached, budget)
            if run.whole or count <= 0:
                break
            longest = max([count] + [c for _, c in plan])
            rows = 1 << len(plan).bit_length()  # the power of two that holds one more row
            if plan and rows * bucket_length(longest, self.context) > self.chunk:
                break
            plan.append((run, count))
            budget -= count
        return plan

    def prefilled(self, run: Run, count: int) -> None:
        """Notes that ``count`` more positions of ``run`` are on their way into the cache, and
        publishes its pages that are now full."""
        run.cached += count
        run.started = True
        full = min(run.cached // self.pool.page_size, len(run.hashes))
        self.pool.publish(run.hashes[:full], run.pages[:full])

    def decoding(self) -> list[Run | None]:
        """Per slot, the run that takes part in the next decode step (prefilled), or None."""
        return [r if r is not None and r.prefilled else None for r in self.runs]

    def grow(self) -> list[Run]:
        """Gives each decoding run the page its next position needs, oldest run first,
        preempting the run admitted last while the pool has none; returns the runs preempted
        (their slots and pages given back)."""
        preempted: list[Run] = []
        for run in sorted((r for r in self.decoding() if r is not None), key=_order):
            while self.runs[run.slot] is run and run.cached // self.pool.page_size >= len(
                run.pages
            ):
                if self.pool.available:
                    run.pages += self.pool.take(1)
                    continue
                victim = max((r for r in self.runs if r is not None), key=_order)
                self.release(victim)
                preempted.append(victim)
        return preempted

    def release(self, run: Run) -> None:
        """Frees ``run``'s slot and pages (its published pages stay cached, idle)."""
        if self.runs[run.slot] is run:
            self.runs[run.slot] = None
            self.pool.release(run.pages)
            run.pages = []

    def table(self, runs: Sequence[Run | None], width: int) -> np.ndarray:
        """Page tables i32 [len(runs), width]: each run's pages, then M (no page: a write
        there is dropped); a row without a run has no page at all."""
        table = np.full((len(runs), width), self.pool.num_pages, np.int32)
        for i, run in enumerate(runs):
            if run is not None:
                pages = run.pages[:width]
                table[i, : len(pages)] = pages
        return table


def _order(run: Run) -> int:
    return run.order


__all__ = ["Run", "Scheduler"]
