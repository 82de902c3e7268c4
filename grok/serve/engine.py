"""Continuous batching: decode slots over one paged KV cache, run by one thread.

Glossary: B slots (``max_batch``), S the most tokens of one sequence (``max_context``), M
pages of Z tokens in the KV pool, n sequences prefilled together, T their bucket length,
V vocab, R reported top logprobs.

The engine thread loops:

1. Admit: waiting sequences go into free slots while the KV pool has pages for their prompts
   (pages of a prompt prefix another sequence computed are shared, from the prefix cache).
2. Prefill: the next pieces of the admitted prompts, at most ``prefill_chunk`` tokens in all,
   in one call ([n, T], n and T rounded up to powers of two so few shapes compile), written
   into the pool through their page tables; a prompt's last piece samples its first token.
3. Decode one step for all B slots at once (one compiled call; slots that are not decoding
   ride along without pages and their results are ignored). Each row samples with its own
   settings (arrays, see ``grok.serve.sampler``) and its own key: ``key_b = fold_in(key(seed),
   choice)``, its i-th token drawn with ``fold_in(key_b, i)`` (the key rule of
   ``grok.decode``), so a request's tokens do not depend on what else is running (nor on a
   preemption: see ``grok.serve.scheduler``).
4. Hand each row's token to its sequence (text, stop strings, logprobs); a sequence that
   finished, whose client went away, or whose logits were not finite (it ends with an
   error) leaves its slot and gives its pages back at once.

Prefill, the step, the sampling hook's place and the cache's carried form are the decode
core's (``grok.decode``), shared with ``generate``; which sequences run, their pages, the
pieces of prompts and preemption are ``grok.serve.scheduler``'s (on the pages of
``grok.serve.pages``); the device state and the compiled programs on it are
``grok.serve.batch``'s; this module runs the loop and hands out what it produces.

Requests are tokenised on the HTTP side and only queued here, so decode keeps running while
they arrive; a new sequence waits at most one engine step before its first piece, and a long
prompt delays the running sequences' next token by one piece's prefill at a time.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grok import decode
from grok.api import Model
from grok.decode import FINISH_LENGTH, FINISH_STOP, Drawn, PagedCache
from grok.errors import GenerationError
from grok.memory_plan import kv_pool_tokens
from grok.serve import batch
from grok.serve.pages import PagePool
from grok.serve.sampler import RowSettings
from grok.serve.scheduler import Run, Scheduler
from grok.serve.sequence import SequenceRequest, TokenInfo, Update
from grok.tokenizer import Tokenizer

log = logging.getLogger("grok.serve")

# The default cache length per slot when --max-context is not given: the whole context of a
# small model, 8192 tokens of a large one (Grok-2's 131072 would need 32 GiB per slot in bf16).
DEFAULT_MAX_CONTEXT = 8192
# Tokens per KV page: vLLM's default block size; the native CPU kernel wants a multiple of 16.
PAGE_SIZE = 16
# The most prompt tokens prefilled between two decode steps: the longest a running stream
# pauses is about one such piece. On the 2-core CPU (a D 512, 8-layer model in float32), a
# 6000-token prompt's last piece of 512 took 10-14% of its whole prefill (attention over the
# 5632 keys before it is most of it), close to the 15% a stream may pause; pieces of 256
# took 5-8%, and the prompt about as long in all. An accelerator wants more (--prefill-chunk).
DEFAULT_PREFILL_CHUNK = 256


class QueueFull(GenerationError):
    """The waiting queue has no room for a request's sequences (the server answers 503)."""


def _top(ids: np.ndarray, logprobs: np.ndarray, k: int | None) -> tuple[tuple[int, float], ...]:
    """The first ``k`` (id, logprob) pairs of [R] ids and logprobs."""
    k = k or 0
    return tuple(zip(ids[:k].tolist(), logprobs[:k].tolist(), strict=True))


def _prompt_tokens(prompt: tuple, i: int, seq: SequenceRequest) -> tuple[TokenInfo, ...]:
    """Row ``i`` of ``_prefill``'s prompt logprobs as ``seq``'s prompt ``TokenInfo``s (the
    first token has no logprob)."""
    given, top_ids, top_lp = prompt
    return tuple(
        TokenInfo(
            tok,
            None if j == 0 else float(given[i, j]),
            () if j == 0 else _top(top_ids[i, j], top_lp[i, j], seq.params.logprobs),
            0,
        )
        for j, tok in enumerate(seq.prompt)
    )


class Engine:
    """The batching engine: ``submit`` sequences, receive ``Update``s through their sinks.

    Construction allocates the device state (the KV pool); ``start`` runs the engine thread.

    Attributes:
      model, tokenizer: what it runs.
      max_batch: B, the decode slots (the decode step's batch width).
      max_context: S, the most tokens (prompt + generated) of one sequence.
      max_queue: the most sequences waiting for a slot; more is ``QueueFull``.
      kv_cache_tokens: the KV pool's size in tokens (M pages of Z).
      prefill_chunk: the most prompt tokens one engine step prefills.
      prefix_cache: whether full prompt pages are shared between sequences.
    """

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 8,
        max_context: int | None = None,
        max_queue: int = 128,
        metrics: Any = None,
        kv_cache_tokens: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        prefix_cache: bool = True,
        page_size: int = PAGE_SIZE,
    ):
        config = model.config
        context = config.max_position_embeddings
        max_context = min(context, DEFAULT_MAX_CONTEXT) if max_context is None else max_context
        if not 1 <= max_context <= context:
            raise GenerationError(
                f"max_context must be in [1, {context}] (max_position_embeddings), "
                f"got {max_context}"
            )
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise GenerationError(
                f"max_batch and prefill_chunk must be >= 1 and max_queue >= 0, got "
                f"{max_batch}, {prefill_chunk}, {max_queue}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_context = max_context
        self.max_queue = max_queue
        self.metrics = metrics
        self.prefill_chunk = prefill_chunk
        self.prefix_cache = prefix_cache
        num_pages = _pool_pages(model, kv_cache_tokens, max_batch, max_context, page_size)
        self.kv_cache_tokens = num_pages * page_size
        store = PagedCache(config, model.dtype, page_size, kernels=model.kernels)
        # The compiled programs' static arguments: the pure forward (params passed in, not
        # closed over) and the cache's store.
        self._static = {"apply_fn": model.apply_fn, "store": store}
        pool = PagePool(num_pages, page_size, prefix_cache=prefix_cache)
        self._sched = Scheduler(pool, slots=max_batch, chunk=prefill_chunk, context=max_context)
        self._waiting: collections.deque[SequenceRequest] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._state = batch.initial_state(model, store, max_batch, num_pages)
        if metrics is not None:
            metrics.set_kv_pages(num_pages)

    # -- the client side (any thread) ------------------------------------------------------

    def start(self) -> None:
        """Starts the engine thread."""
        self._thread = threading.Thread(target=self._run, name="grok-serve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the engine thread (running sequences are dropped)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def healthy(self) -> bool:
        """Whether the engine thread is running."""
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def submit(self, sequences: Sequence[SequenceRequest]) -> None:
        """Queues sequences (all or none); QueueFull when the queue has no room for them."""
        with self._cv:
            if self.error is not None:
                raise GenerationError(f"the engine stopped after an error: {self.error}")
            free = self._sched.free_slots()
            if len(self._waiting) + len(sequences) > self.max_queue + free:
                raise QueueFull(
                    f"the server is busy: {len(self._waiting)} sequences are waiting "
                    f"(--max-queue {self.max_queue}); retry later"
                )
            self._waiting.extend(sequences)
            self._cv.notify_all()
        self._report_load()

    def _report_load(self) -> None:
        if self.metrics is not None:
            sched = self._sched
            self.metrics.set_load(len(self._waiting), self.max_batch - sched.free_slots())
            self.metrics.set_kv(sched.pool.held / sched.pool.num_pages, sched.pool.cached)

    # -- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        # One decode step stays in flight: step k+1 is dispatched before step k's tokens are
        # handed out, so the host's work (text, stop strings, responses) overlaps the
        # device's. A sequence that finished at step k rides along in step k+1 (its row is
        # ignored; its pages, given back after that step was dispatched, have room for it).
        in_flight: tuple[Drawn, list[Run | None]] | None = None
        try:
            while True:
                with self._cv:
                    while not (self._stopping or self._waiting or self._busy() or in_flight):
                        self._cv.wait()
                    if self._stopping:
                        return
                self._admit()
                self._prefill_isolated()
                launched = self._launch()
                if in_flight is not None:
                    self._collect(*in_flight)
                in_flight = launched
                self._report_load()
        except BaseException as e:  # report it to every client, then stop: /health says 503
            log.exception("the engine failed")
            self.error = e
            with self._cv:
                pending = [r.seq for r in self._sched.runs if r is not None] + list(self._waiting)
                self._waiting.clear()
                self._sched.runs = [None] * self.max_batch
            for seq in pending:
                self._emit(seq, Update(seq.index, error=f"the engine failed: {e}"))

    def _busy(self) -> bool:
        return any(r is not None for r in self._sched.runs)

    def _emit(self, seq: SequenceRequest, update: Update) -> None:
        """Hands ``update`` to the sequence's owner; an owner that fails only loses its own
        sequence (it is cancelled), never the engine."""
        try:
            seq.sink(update)
        except Exception:
            log.exception("handing an update to sequence %d failed; cancelling it", seq.index)
            seq.cancel()

    def _admit(self) -> None:
        """Admits waiting sequences, in order, while a slot is free and the pool has pages for
        them; drops the cancelled ones (waiting, or admitted and not yet decoding)."""
        for run in self._sched.runs:
            if run is not None and not run.prefilled and run.seq.cancelled:
                self._release(run, "cancelled")
        with self._cv:
            while self._waiting:
                seq = self._waiting[0]
                if not seq.cancelled:
                    tokens = seq.prompt + seq.generated
                    whole = seq.params.prompt_logprobs and not seq.generated
                    run = self._sched.admit(seq, tokens, len(seq.prompt), whole=whole)
                    if run is None:
                        break
                    if self.metrics is not None and self.prefix_cache and not whole:
                        self.metrics.prefix_lookup(run.cached, len(tokens))
                self._waiting.popleft()

    def _prefill(self) -> None:
        """Prefills this step's pieces of the admitted prompts (one compiled call) and hands
        each prompt that is complete its first token (and its logprobs, when asked)."""
        plan = self._sched.plan()
        if not plan:
            return
        want_prompt = plan[0][0].whole
        width = max(len(run.pages) for run, _ in plan)
        inputs = batch.prefill_inputs(
            plan,
            self._sched,
            batch=self.max_batch,
            width=self._width(width),
            settings=_row_settings,
            key=_key,
        )
        self._state, drawn, prompt = batch.prefill(
            self.model.params,
            self.model.rope,
            self._state,
            inputs,
            prompt_logprobs=want_prompt,
            **self._static,
        )
        for run, count in plan:
            self._sched.prefilled(run, count)
        done = [(i, run) for i, (run, _) in enumerate(plan) if run.prefilled]
        if not done:
            return
        drawn, prompt = jax.device_get((drawn, prompt))
        for i, run in done:
            seq = run.seq
            prompt_tokens = None if prompt is None else _prompt_tokens(prompt, i, seq)
            if seq.params.max_tokens == 0:  # nothing to generate (echo scoring)
                self._finish(run, FINISH_LENGTH, prompt_tokens=prompt_tokens)
            else:
                self._deliver(run, drawn, i, prompt_tokens)

    def _width(self, pages: int) -> int:
        """The page-table width of a call whose rows hold up to ``pages`` pages."""
        z = self._sched.pool.page_size
        return self.model.kernels.paged_width(pages, self._sched.width, z)

    def _launch(self) -> tuple[Drawn, list[Run | None]] | None:
        """Gives the decoding sequences the pages their next position needs (preempting the
        last admitted when the pool has none) and dispatches one decode step (not waited
        for); returns its draw and the slots' runs at that moment, or None with nothing to
        decode."""
        with self._cv:
            preempted = self._sched.grow()
            self._waiting.extendleft(reversed([run.seq for run in preempted]))
            for run in preempted:
                log.info("sequence %d preempted (the KV pool is full)", run.seq.index)
                if self.metrics is not None:
                    self.metrics.preempted()
        runs = self._sched.decoding()
        if not any(runs):
            return None
        active = np.array([r is not None for r in runs])
        table = self._sched.table(runs, self._width(max(len(r.pages) for r in runs if r)))
        self._state, drawn = batch.decode_step(
            self.model.params,
            self.model.rope,
            self._state,
            jnp.asarray(active),
            jnp.asarray(table),
            **self._static,
        )
        for run in runs:
            if run is not None:
                run.cached += 1  # the step writes its last token
        return drawn, runs

    def _collect(self, drawn: Drawn, runs: list[Run | None]) -> None:
        """Hands a step's tokens to the sequences still in the slots they had then."""
        drawn = jax.device_get(drawn)
        for slot, run in enumerate(runs):
            if run is not None and self._sched.runs[slot] is run:
                self._deliver(run, drawn, slot, None)

    def _hand_out(
        self,
        run: Run,
        drawn: Drawn,
        row: int,
        prompt_tokens: tuple[TokenInfo, ...] | None,
    ) -> None:
        """Hands row ``row`` of ``drawn`` to ``run``'s sequence; frees its slot when done."""
        seq = run.seq
        if seq.cancelled:
            self._release(run, "cancelled")
            return
        if drawn.nonfinite[row]:
            self._fail(run, decode.nonfinite_error(seq.index, seq.num_tokens + 1))
            return
        now = time.perf_counter()
        if self.metrics is not None:
            if seq.last_token_at is None:
                self.metrics.first_token(now - seq.submitted_at)
            else:
                self.metrics.next_token(now - seq.last_token_at)
        seq.last_token_at = now
        seq.num_tokens += 1
        token = int(drawn.token[row])
        seq.generated.append(token)
        p, draw = seq.params, drawn.report
        infos: tuple[TokenInfo, ...] = ()
        stop_id = token in p.stop_ids and seq.num_tokens > p.min_tokens
        if not stop_id:
            offset = seq.text.push(token)
            if p.logprobs is not None:
                top = _top(draw.top_ids[row], draw.top_logprobs[row], p.logprobs)
                infos = (TokenInfo(token, float(draw.logprob[row]), top, offset),)
        reason = decode.finish_reason(
            stopped=stop_id or seq.text.stopped, num_new=seq.num_tokens, max_new=p.max_tokens
        )
        if reason is None:
            update = Update(seq.index, seq.text.take(), infos, None, seq.num_tokens, prompt_tokens)
            self._emit(seq, update)
            return
        if not seq.text.stopped:  # a stop token or the budget: release any held-back text
            seq.text.finish()
        self._finish(run, reason, infos, prompt_tokens)

    def _fail(self, run: Run, error: GenerationError) -> None:
        """Ends ``run``'s sequence with ``error`` (its slot freed, its owner told)."""
        seq = run.seq
        log.error("sequence %d failed: %s", seq.index, error)
        seq.finish_reason = "error"
        self._release(run, "error")
        self._emit(seq, Update(seq.index, error=str(error)))

    def _finish(
        self,
        run: Run,
        reason: str,
        infos: tuple[TokenInfo, ...] = (),
        prompt_tokens: tuple[TokenInfo, ...] | None = None,
    ) -> None:
        seq = run.seq
        seq.finish_reason = reason
        self._release(run, reason)
        update = Update(seq.index, seq.text.take(), infos, reason, seq.num_tokens, prompt_tokens)
        self._emit(seq, update)

    def _release(self, run: Run, reason: str) -> None:
        with self._cv:
            self._sched.release(run)
        if self.metrics is not None:
            self.metrics.sequence_done(reason, run.seq.num_tokens)

    # -- fault isolation: one sequence's error ends that sequence, never the engine ----------

    def _prefill_isolated(self) -> None:
        """``_prefill``, where an error that leaves the device state whole (a bad setting met
        while building the inputs, a failed transfer) ends only the sequences it concerns:
        each of the step's pieces has its inputs built alone, and a sequence whose inputs fail
        alone ends with an error (the others are prefilled at the next step); where none
        fails alone, the step's sequences end with the error. An error that consumed the
        (donated) state stops the engine."""
        try:
            self._prefill()
        except Exception as e:
            if self._state_lost():
                raise
            log.exception("a prefill failed; the engine goes on")
            plan = self._sched.plan()
            failed = [run for run, count in plan if self._inputs_fail(run, count)]
            for run in failed or [run for run, _ in plan]:
                error = GenerationError(f"sequence {run.seq.index} failed in its prefill: {e!r}")
                self._fail(run, error)

    def _inputs_fail(self, run: Run, count: int) -> bool:
        """Whether building the prefill inputs of ``run``'s next ``count`` tokens alone fails."""
        try:
            batch.prefill_inputs(
                [(run, count)],
                self._sched,
                batch=self.max_batch,
                width=self._width(len(run.pages)),
                settings=_row_settings,
                key=_key,
            )
        except Exception:
            return True
        return False

    def _state_lost(self) -> bool:
        """Whether the device state's buffers are gone (donated to a call that failed)."""
        leaves = jax.tree.leaves(self._state)
        return any(isinstance(x, jax.Array) and x.is_deleted() for x in leaves)

    def _deliver(
        self,
        run: Run,
        drawn: Drawn,
        row: int,
        prompt_tokens: tuple[TokenInfo, ...] | None,
    ) -> None:
        """``_hand_out``, where an error (the tokenizer, the stop strings, the owner's sink)
        ends this sequence with an error and the engine goes on."""
        try:
            self._hand_out(run, drawn, row, prompt_tokens)
        except Exception as e:
            log.exception("handing a token to sequence %d failed; ending it", run.seq.index)
            if self._sched.runs[run.slot] is run:
                self._fail(run, GenerationError(f"sequence {run.seq.index} failed: {e!r}"))


def _pool_pages(
    model: Model, tokens: int | None, max_batch: int, max_context: int, page_size: int
) -> int:
    """The KV pool's pages: ``tokens`` (--kv-cache-tokens) rounded down to whole pages, or by
    default what fits beside the weights (``grok.memory_plan.kv_pool_tokens``), at most
    ``max_batch`` whole contexts. GenerationError where the pool could not hold one sequence of
    ``max_context`` tokens."""
    if tokens is None:
        most = max_batch * max_context
        tokens = kv_pool_tokens(
            model.config, model.params, model.mesh, dtype=model.dtype, most=most
        )
    pages = tokens // page_size
    if pages * page_size < max_context:
        raise GenerationError(
            f"the KV cache holds {pages * page_size} tokens ({pages} pages of {page_size}), "
            f"fewer than one sequence of max_context {max_context}: raise --kv-cache-tokens "
            "(or free device memory), or lower --max-context"
        )
    return pages


def _row_settings(seq: SequenceRequest) -> dict[str, float]:
    """A sequence's ``RowSettings`` fields."""
    return {f.name: getattr(seq.params, f.name) for f in dataclasses.fields(RowSettings)}


def _key(seq: SequenceRequest) -> tuple[int, int]:
    """A sequence's (seed, choice): its key is ``fold_in(key(seed), choice)``."""
    return seq.params.seed, seq.index


__all__ = [
    "DEFAULT_MAX_CONTEXT",
    "DEFAULT_PREFILL_CHUNK",
    "PAGE_SIZE",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "Engine",
    "QueueFull",
]
