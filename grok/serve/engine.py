"""Continuous batching: a fixed set of decode slots sharing one KV cache, run by one thread.

Glossary: B slots (``max_batch``), S cache length per slot (``max_context``), n sequences
prefilled together, T their prompt bucket, V vocab, R reported top logprobs, L layers,
K kv heads, H head dim.

The engine thread loops:

1. Admit: waiting sequences go into free slots. They are prefilled together ([n, T], n and T
   rounded up to powers of two so few shapes compile) into a small cache that is then written
   into their slots' rows of the big one, and each samples its first token.
2. Decode one step for all B slots at once (one compiled call; free slots ride along and
   their results are ignored). Each row samples with its own settings (arrays, see
   ``grok.serve.sampler``) and its own key: ``key_b = fold_in(key(seed), choice)``, its i-th
   token drawn with ``fold_in(key_b, i)`` (the key rule of ``grok.decode``), so a request's
   tokens do not depend on what else is running.
3. Hand each row's token to its sequence (text, stop strings, logprobs); a sequence that
   finished, whose client went away, or whose logits were not finite (it ends with an
   error) leaves its slot at once.

Prefill, the step, the sampling hook's place and the cache's carried form are the decode
core's (``grok.decode``), shared with ``generate``; the slots' device state and the compiled
programs on it are ``grok.serve.batch``'s; this module schedules the slots and hands out
what they produce.

Requests are tokenised on the HTTP side and only queued here, so decode keeps running while
they arrive; a new sequence waits at most one decode step before its prefill. A prefill runs
between two decode steps, so a long prompt delays the running sequences' next token by its
prefill time (prompts are not split into chunks).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grok import decode
from grok.api import Model
from grok.decode import FINISH_LENGTH, FINISH_STOP, DenseCache, Drawn, bucket_length
from grok.errors import GenerationError
from grok.serve import batch
from grok.serve.sampler import RowSettings
from grok.serve.text import TextTracker
from grok.tokenizer import Tokenizer

log = logging.getLogger("grok.serve")

# The default cache length per slot when --max-context is not given: the whole context of a
# small model, 8192 tokens of a large one (Grok-2's 131072 would need 32 GiB per slot in bf16).
DEFAULT_MAX_CONTEXT = 8192


class QueueFull(GenerationError):
    """The waiting queue has no room for a request's sequences (the server answers 503)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """One sequence's generation settings (validated by ``grok.serve.protocol``).

    Attributes:
      max_tokens: the most new tokens (a stop token counts as one).
      min_tokens: the first min_tokens tokens never end the sequence: a stop token among
        them is kept as a token (a special one adds no text), and stop strings are looked
        for only in the text after them.
      temperature, top_k, top_p, min_p, presence_penalty, frequency_penalty: see
        ``RowSettings`` (top_k 0 and top_p 1 are off).
      seed: the request's seed; choice c of it draws from ``fold_in(key(seed), c)``.
      stop: strings that end the sequence (cut from its text).
      stop_ids: token ids that end the sequence (end of sequence, chat separator).
      logprobs: report each token's logprob with this many alternatives (0..R), or None.
      prompt_logprobs: also report the prompt tokens' logprobs (``echo`` with logprobs).
    """

    max_tokens: int
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None
    prompt_logprobs: bool = False


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    """One generated (or prompt) token as reported: its id, logprob, alternatives [R] and
    the character offset of its text in the sequence's text."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...]
    offset: int


@dataclasses.dataclass(frozen=True)
class Update:
    """What the engine hands a sequence's owner after a step.

    Attributes:
      index: the sequence's choice index in its response.
      text: new final text (possibly empty).
      tokens: the tokens behind it, when logprobs were asked for (else empty).
      finish_reason: None while running, then "stop" or "length".
      num_tokens: tokens generated so far (stop token included).
      prompt_tokens: the prompt tokens' logprobs, in the first update when asked for.
      error: set when the engine failed, or the sequence did (non-finite logits, an error
        in its text, its stop strings or its prefill); the sequence is over.
    """

    index: int
    text: str = ""
    tokens: tuple[TokenInfo, ...] = ()
    finish_reason: str | None = None
    num_tokens: int = 0
    prompt_tokens: tuple[TokenInfo, ...] | None = None
    error: str | None = None


class SequenceRequest:
    """One sequence to generate: a prompt, its settings, and where its updates go.

    ``sink(update)`` is called from the engine thread (use ``loop.call_soon_threadsafe`` to
    reach an event loop). ``cancel()`` may be called from any thread.
    """

    def __init__(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        sink: Callable[[Update], None],
        tokenizer: Tokenizer,
        *,
        index: int = 0,
    ):
        self.prompt = list(prompt)
        self.params = params
        self.sink = sink
        self.index = index
        self.text = TextTracker(tokenizer, params.stop, min_tokens=params.min_tokens)
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self.cancelled = False
        self.submitted_at = time.perf_counter()
        self.last_token_at: float | None = None

    def cancel(self) -> None:
        """Asks the engine to drop the sequence (its slot is freed before the next step)."""
        self.cancelled = True


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

    Construction allocates the device state (the KV cache for B x S tokens); ``start`` runs
    the engine thread.

    Attributes:
      model, tokenizer: what it runs.
      max_batch: B, the decode slots.
      max_context: S, the most tokens (prompt + generated) of one sequence.
      max_queue: the most sequences waiting for a slot; more is ``QueueFull``.
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
    ):
        config = model.config
        context = config.max_position_embeddings
        max_context = min(context, DEFAULT_MAX_CONTEXT) if max_context is None else max_context
        if not 1 <= max_context <= context:
            raise GenerationError(
                f"max_context must be in [1, {context}] (max_position_embeddings), "
                f"got {max_context}"
            )
        if max_batch < 1 or max_queue < 0:
            raise GenerationError(
                f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_context = max_context
        self.max_queue = max_queue
        self.metrics = metrics
        store = DenseCache(config, model.dtype, kernels=model.kernels)
        # The compiled programs' static arguments: the pure forward (params passed in, not
        # closed over) and the cache's store.
        self._static = {"apply_fn": model.apply_fn, "store": store}
        self._slots: list[SequenceRequest | None] = [None] * max_batch
        self._waiting: collections.deque[SequenceRequest] = collections.deque()
        self._admitting: list[SequenceRequest] = []  # taken from the queue, not yet in a slot
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._state = batch.initial_state(model, store, max_batch, max_context)

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
            if len(self._waiting) + len(sequences) > self.max_queue + self._free_slots():
                raise QueueFull(
                    f"the server is busy: {len(self._waiting)} sequences are waiting "
                    f"(--max-queue {self.max_queue}); retry later"
                )
            self._waiting.extend(sequences)
            self._cv.notify_all()
        self._report_load()

    def _free_slots(self) -> int:
        return sum(s is None for s in self._slots)

    def _report_load(self) -> None:
        if self.metrics is not None:
            self.metrics.set_load(len(self._waiting), self.max_batch - self._free_slots())

    # -- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        # One decode step stays in flight: step k+1 is dispatched before step k's tokens are
        # handed out, so the host's work (text, stop strings, responses) overlaps the
        # device's. A sequence that finished at step k rides along in step k+1 (its row is
        # ignored; the cache has room, since prompt + max_tokens <= S).
        in_flight: tuple[Drawn, list[SequenceRequest | None]] | None = None
        try:
            while True:
                with self._cv:
                    while not (self._stopping or self._waiting or any(self._slots) or in_flight):
                        self._cv.wait()
                    if self._stopping:
                        return
                self._admit()
                launched = self._launch() if any(self._slots) else None
                if in_flight is not None:
                    self._collect(*in_flight)
                in_flight = launched
                self._report_load()
        except BaseException as e:  # report it to every client, then stop: /health says 503
            log.exception("the engine failed")
            self.error = e
            with self._cv:
                pending = [s for s in self._slots if s is not None] + list(self._waiting)
                pending += [s for s in self._admitting if s not in pending]
                self._waiting.clear()
                self._slots = [None] * self.max_batch
            for seq in pending:
                self._emit(seq, Update(seq.index, error=f"the engine failed: {e}"))

    def _emit(self, seq: SequenceRequest, update: Update) -> None:
        """Hands ``update`` to the sequence's owner; an owner that fails only loses its own
        sequence (it is cancelled), never the engine."""
        try:
            seq.sink(update)
        except Exception:
            log.exception("handing an update to sequence %d failed; cancelling it", seq.index)
            seq.cancel()

    def _admit(self) -> None:
        """Prefills waiting sequences into free slots (one call per group of equal needs)."""
        with self._cv:
            free = [i for i, s in enumerate(self._slots) if s is None]
            taken: list[SequenceRequest] = []
            while self._waiting and len(taken) < len(free):
                seq = self._waiting.popleft()
                if not seq.cancelled:
                    taken.append(seq)
            self._admitting = taken
        if not taken:
            return
        for want_prompt in (False, True):
            group = [s for s in taken if s.params.prompt_logprobs == want_prompt]
            if group:
                slots, free = free[: len(group)], free[len(group) :]
                self._prefill_isolated(group, slots, want_prompt)
        self._admitting = []

    def _prefill(self, group: list[SequenceRequest], slots: list[int], want_prompt: bool) -> None:
        """Prefills ``group`` into ``slots`` (one compiled call) and hands each its first token
        (and its prompt's logprobs with ``want_prompt``)."""
        self._state, drawn, prompt = batch.prefill(
            self.model.params,
            self.model.rope,
            self._state,
            *self._prefill_inputs(group, slots),
            prompt_logprobs=want_prompt,
            **self._static,
        )
        drawn, prompt = jax.device_get((drawn, prompt))
        for i, seq in enumerate(group):
            prompt_tokens = None if prompt is None else _prompt_tokens(prompt, i, seq)
            with self._cv:
                self._slots[slots[i]] = seq
            if seq.params.max_tokens == 0:  # nothing to generate (echo scoring)
                self._finish(seq, slots[i], FINISH_LENGTH, prompt_tokens=prompt_tokens)
            else:
                self._deliver(seq, slots[i], drawn, i, prompt_tokens)

    def _prefill_inputs(self, group: list[SequenceRequest], slots: list[int]) -> tuple:
        """``_prefill``'s inputs for ``group``: tokens [n, T], lengths, slots, settings, seeds
        and choices [n]. One row, or all B: two compiled shapes per prompt bucket (a few idle
        rows cost less than a compile per batch size on a small model; the rows run in one
        call). Padding rows go to slot B (dropped)."""
        n = 1 if len(group) == 1 else self.max_batch
        longest = max(len(s.prompt) for s in group)
        t = min(bucket_length(longest, self.model.config.max_position_embeddings), self.max_context)
        tokens = np.zeros((n, t), np.int32)  # [n, T], right-padded with id 0
        lengths = np.ones((n,), np.int32)
        slot_ids = np.full((n,), self.max_batch, np.int32)  # padding rows are dropped
        seeds = np.zeros((n,), np.uint32)
        choices = np.zeros((n,), np.uint32)
        rows: dict[str, list[float]] = {f.name: [] for f in dataclasses.fields(RowSettings)}
        for i in range(n):
            seq = group[i] if i < len(group) else None
            p = seq.params if seq is not None else SamplingParams(max_tokens=0)
            if seq is not None:
                tokens[i, : len(seq.prompt)] = seq.prompt
                lengths[i] = len(seq.prompt)
                slot_ids[i] = slots[i]
                seeds[i] = p.seed
                choices[i] = seq.index
            for name in rows:
                rows[name].append(getattr(p, name))
        settings = RowSettings(
            **{
                name: jnp.asarray(values, jnp.int32 if name == "top_k" else jnp.float32)
                for name, values in rows.items()
            }
        )
        arrays = (jnp.asarray(x) for x in (tokens, lengths, slot_ids))
        return (*arrays, settings, jnp.asarray(seeds), jnp.asarray(choices))

    def _launch(self) -> tuple[Drawn, list[SequenceRequest | None]]:
        """Dispatches one decode step (not waited for); returns its draw and the slots'
        sequences at that moment."""
        seqs = list(self._slots)
        active = np.array([s is not None for s in seqs])
        self._state, drawn = batch.decode_step(
            self.model.params, self.model.rope, self._state, jnp.asarray(active), **self._static
        )
        return drawn, seqs

    def _collect(self, drawn: Drawn, seqs: list[SequenceRequest | None]) -> None:
        """Hands a step's tokens to the sequences still in the slots they had then."""
        drawn = jax.device_get(drawn)
        for slot, seq in enumerate(seqs):
            if seq is not None and self._slots[slot] is seq:
                self._deliver(seq, slot, drawn, slot, None)

    def _hand_out(
        self,
        seq: SequenceRequest,
        slot: int,
        drawn: Drawn,
        row: int,
        prompt_tokens: tuple[TokenInfo, ...] | None,
    ) -> None:
        """Hands row ``row`` of ``drawn`` to ``seq`` (in ``slot``); frees the slot when done."""
        if seq.cancelled:
            self._release(slot, seq, "cancelled")
            return
        if drawn.nonfinite[row]:
            self._fail(seq, slot, decode.nonfinite_error(seq.index, seq.num_tokens + 1))
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
        self._finish(seq, slot, reason, infos, prompt_tokens)

    def _fail(self, seq: SequenceRequest, slot: int, error: GenerationError) -> None:
        """Ends ``seq`` with ``error`` (its slot freed, its owner told)."""
        log.error("sequence %d failed: %s", seq.index, error)
        seq.finish_reason = "error"
        self._release(slot, seq, "error")
        self._emit(seq, Update(seq.index, error=str(error)))

    def _finish(
        self,
        seq: SequenceRequest,
        slot: int,
        reason: str,
        infos: tuple[TokenInfo, ...] = (),
        prompt_tokens: tuple[TokenInfo, ...] | None = None,
    ) -> None:
        seq.finish_reason = reason
        self._release(slot, seq, reason)
        update = Update(seq.index, seq.text.take(), infos, reason, seq.num_tokens, prompt_tokens)
        self._emit(seq, update)

    def _release(self, slot: int, seq: SequenceRequest, reason: str) -> None:
        with self._cv:
            if self._slots[slot] is seq:
                self._slots[slot] = None
        if self.metrics is not None:
            self.metrics.sequence_done(reason, seq.num_tokens)

    # -- fault isolation: one sequence's error ends that sequence, never the engine ----------

    def _prefill_isolated(
        self, group: list[SequenceRequest], slots: list[int], want_prompt: bool
    ) -> None:
        """``_prefill``, where an error that leaves the device state whole (a bad setting
        met while building the inputs, a failed transfer) ends only the sequences it
        concerns: a group is retried one sequence at a time, and a sequence that fails alone
        ends with an error. An error that consumed the (donated) state stops the engine."""
        try:
            self._prefill(group, slots, want_prompt)
        except Exception as e:
            if self._state_lost():
                raise
            log.exception("prefilling %d sequence(s) failed; the engine goes on", len(group))
            for seq, slot in zip(group, slots, strict=True):
                placed = self._slots[slot] is seq
                if seq.finish_reason is not None or (placed and seq.num_tokens > 0):
                    continue  # finished, or running: the error was another's
                if placed or len(group) == 1:
                    error = GenerationError(f"sequence {seq.index} failed in its prefill: {e!r}")
                    self._fail(seq, slot, error)
                elif not seq.cancelled:
                    self._prefill_isolated([seq], [slot], want_prompt)

    def _state_lost(self) -> bool:
        """Whether the device state's buffers are gone (donated to a call that failed)."""
        leaves = jax.tree.leaves(self._state)
        return any(isinstance(x, jax.Array) and x.is_deleted() for x in leaves)

    def _deliver(
        self,
        seq: SequenceRequest,
        slot: int,
        drawn: Drawn,
        row: int,
        prompt_tokens: tuple[TokenInfo, ...] | None,
    ) -> None:
        """``_hand_out``, where an error (the tokenizer, the stop strings, the owner's sink)
        ends this sequence with an error and the engine goes on."""
        try:
            self._hand_out(seq, slot, drawn, row, prompt_tokens)
        except Exception as e:
            log.exception("handing a token to sequence %d failed; ending it", seq.index)
            self._fail(seq, slot, GenerationError(f"sequence {seq.index} failed: {e!r}"))


__all__ = [
    "DEFAULT_MAX_CONTEXT",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "Engine",
    "QueueFull",
    "SamplingParams",
    "SequenceRequest",
    "TokenInfo",
    "Update",
]
