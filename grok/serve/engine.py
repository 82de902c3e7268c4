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
   ``grok.serve.sampler``) and its own key ``fold_in(fold_in(key(seed), choice), i)`` for its
   i-th token, so a request's tokens do not depend on what else is running.
3. Hand each row's token to its sequence (text, stop strings, logprobs); a sequence that
   finished, or whose client went away, leaves its slot at once.

Requests are tokenised on the HTTP side and only queued here, so decode keeps running while
they arrive; a new sequence waits at most one decode step before its prefill. A prefill runs
between two decode steps, so a long prompt delays the running sequences' next token by its
prefill time (prompts are not split into chunks).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grok.api import Model
from grok.errors import GenerationError
from grok.generate import bucket_length
from grok.kv_cache import KVCache
from grok.serve.sampler import TOP_LOGPROBS, Draw, RowSettings, sample_rows
from grok.serve.text import TextTracker
from grok.sharding import kv_cache_sharding
from grok.tokenizer import Tokenizer

log = logging.getLogger("grok.serve")

# The default cache length per slot when --max-context is not given: the whole context of a
# small model, 8192 tokens of a large one (Grok-2's 131072 would need 32 GiB per slot in bf16).
DEFAULT_MAX_CONTEXT = 8192

FINISH_STOP = "stop"  # a stop token or a stop string
FINISH_LENGTH = "length"  # max_tokens tokens were produced


class QueueFull(GenerationError):
    """The waiting queue has no room for a request's sequences (the server answers 503)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """One sequence's generation settings (validated by ``grok.serve.protocol``).

    Attributes:
      max_tokens: the most new tokens (a stop token counts as one).
      temperature, top_k, top_p, min_p, presence_penalty, frequency_penalty: see
        ``RowSettings`` (top_k 0 and top_p 1 are off).
      seed: the request's seed; choice c of it draws from ``fold_in(key(seed), c)``.
      stop: strings that end the sequence (cut from its text).
      stop_ids: token ids that end the sequence (end of sequence, chat separator).
      logprobs: report each token's logprob with this many alternatives (0..R), or None.
      prompt_logprobs: also report the prompt tokens' logprobs (``echo`` with logprobs).
    """

    max_tokens: int
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
      error: set when the engine failed; the sequence is over.
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
        self.text = TextTracker(tokenizer, params.stop)
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self.cancelled = False
        self.submitted_at = time.perf_counter()
        self.last_token_at: float | None = None

    def cancel(self) -> None:
        """Asks the engine to drop the sequence (its slot is freed before the next step)."""
        self.cancelled = True


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
    """The device state of all B slots (a pytree, donated to every step).

    Attributes:
      cache: the shared KV cache, k/v [L, B, S, K, H] (in the kernels' carried form,
        ``Kernels.carry``).
      token: i32 [B], each slot's last sampled token (the next step's input).
      position: i32 [B], that token's position.
      num_new: i32 [B], tokens sampled so far (the counter folded into the key).
      counts: i32 [B, V], how often each token was generated (for the penalties).
      keys: u32 [B, 2]-like raw key data of each slot's PRNG key.
      settings: the slots' ``RowSettings``.
    """

    cache: KVCache
    token: jax.Array
    position: jax.Array
    num_new: jax.Array
    counts: jax.Array
    keys: jax.Array
    settings: RowSettings


def _set_rows(array: jax.Array, slots: jax.Array, values: jax.Array) -> jax.Array:
    """array[slots] = values along axis 0; slots >= B (padding rows) are dropped."""
    return array.at[slots].set(values.astype(array.dtype), mode="drop")


@functools.partial(
    jax.jit, static_argnames=("apply_fn", "dtype", "prompt_logprobs"), donate_argnames=("state",)
)
def _prefill(
    params: Any,
    rope: Any,
    state: SlotState,
    tokens: jax.Array,
    lengths: jax.Array,
    slots: jax.Array,
    settings: RowSettings,
    seeds: jax.Array,
    choices: jax.Array,
    *,
    apply_fn: Callable,
    dtype: jnp.dtype,
    prompt_logprobs: bool,
) -> tuple[SlotState, Draw, tuple[jax.Array, jax.Array, jax.Array] | None]:
    """Prefills n prompts tokens [n, T] (row i valid up to lengths[i]) into slots [n] (``dtype``:
    the cache's own, as the state may hold it as bits).

    Returns the new state, the first token's ``Draw`` [n], and with ``prompt_logprobs`` the
    prompt tokens' logprobs [n, T] (entry t: token t given tokens < t; entry 0 is unused) with
    the alternatives at each position (ids and logprobs [n, T, R]).
    """
    n, t = tokens.shape
    layers, _, _, kv_heads, head_dim = state.cache.k.shape
    small_shape = (layers, n, t, kv_heads, head_dim)
    small = KVCache(
        k=jnp.zeros(small_shape, dtype),
        v=jnp.zeros(small_shape, dtype),
        lengths=jnp.zeros((n,), jnp.int32),
    )
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, t))  # [n, T]
    logits_at = None if prompt_logprobs else lengths - 1
    logits, small = apply_fn(params, tokens, positions, rope, small, lengths, logits_at)
    prompt = None
    if prompt_logprobs:  # logits [n, T, V]
        lp = jax.nn.log_softmax(logits, axis=-1)
        given = jnp.take_along_axis(lp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]  # [n, T-1]
        given = jnp.pad(given, ((0, 0), (1, 0)))  # [n, T]; entry t is token t's logprob
        top_lp, top_ids = jax.lax.top_k(lp, TOP_LOGPROBS)  # [n, T, R], predicting t + 1
        top_lp = jnp.pad(top_lp[:, :-1], ((0, 0), (1, 0), (0, 0)))  # shifted to token t
        top_ids = jnp.pad(top_ids[:, :-1], ((0, 0), (1, 0), (0, 0)))
        prompt = (given, top_ids.astype(jnp.int32), top_lp)
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [n, V]
    else:
        last = logits[:, 0]  # [n, V]
    vocab = last.shape[-1]
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, choices)
    zeros = jnp.zeros((n,), jnp.int32)
    draw = sample_rows(last, jnp.zeros((n, vocab), jnp.int32), settings, keys, zeros)

    cache, small = state.cache, apply_fn.kernels.carry(small)  # the state holds it carried
    cache = KVCache(
        k=cache.k.at[:, slots, :t].set(small.k, mode="drop"),
        v=cache.v.at[:, slots, :t].set(small.v, mode="drop"),
        lengths=_set_rows(cache.lengths, slots, lengths),
    )
    state = SlotState(
        cache=cache,
        token=_set_rows(state.token, slots, draw.token),
        position=_set_rows(state.position, slots, lengths),
        num_new=_set_rows(state.num_new, slots, zeros + 1),
        counts=_set_rows(state.counts, slots, jax.nn.one_hot(draw.token, vocab, dtype=jnp.int32)),
        keys=_set_rows(state.keys, slots, jax.random.key_data(keys)),
        settings=jax.tree_util.tree_map(
            lambda old, new: _set_rows(old, slots, new), state.settings, settings
        ),
    )
    return state, draw, prompt


@functools.partial(jax.jit, static_argnames=("apply_fn", "dtype"), donate_argnames=("state",))
def _decode_step(
    params: Any,
    rope: Any,
    state: SlotState,
    active: jax.Array,
    *,
    apply_fn: Callable,
    dtype: jnp.dtype,
) -> tuple[SlotState, Draw]:
    """One token for every slot; only ``active`` [B] slots advance."""
    cache = apply_fn.kernels.uncarry(state.cache, dtype)
    logits, cache = apply_fn(
        params, state.token[:, None], state.position[:, None], rope, cache, state.position + 1
    )  # [B, 1, V]
    cache = apply_fn.kernels.carry(cache)
    keys = jax.random.wrap_key_data(state.keys)
    draw = sample_rows(logits[:, 0], state.counts, state.settings, keys, state.num_new)
    step = active.astype(jnp.int32)  # [B]
    rows = jnp.arange(step.shape[0])
    state = SlotState(
        cache=cache,
        token=jnp.where(active, draw.token, state.token),
        position=state.position + step,
        num_new=state.num_new + step,
        counts=state.counts.at[rows, draw.token].add(step),
        keys=state.keys,
        settings=state.settings,
    )
    return state, draw


def _top(ids: np.ndarray, logprobs: np.ndarray, k: int | None) -> tuple[tuple[int, float], ...]:
    """The first ``k`` (id, logprob) pairs of [R] ids and logprobs."""
    k = k or 0
    return tuple(zip(ids[:k].tolist(), logprobs[:k].tolist(), strict=True))


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
        self._apply = model.apply_fn  # the pure forward (params passed in, not closed over)
        self._slots: list[SequenceRequest | None] = [None] * max_batch
        self._waiting: collections.deque[SequenceRequest] = collections.deque()
        self._admitting: list[SequenceRequest] = []  # taken from the queue, not yet in a slot
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._state = self._initial_state()

    def _initial_state(self) -> SlotState:
        b, cfg = self.max_batch, self.model.config
        # Held in the kernels' carried form between steps (Kernels.carry): never copied whole.
        cache = KVCache.create(cfg, b, self.max_context, self.model.dtype)
        cache = self._apply.kernels.carry(cache)

        def zeros() -> jax.Array:  # a new buffer each: the state is donated, field by field
            return jnp.zeros((b,), jnp.int32)

        key_data = jax.random.key_data(jax.vmap(jax.random.key)(jnp.zeros((b,), jnp.uint32)))
        state = SlotState(
            cache=cache,
            token=zeros(),
            position=zeros(),
            num_new=zeros(),
            counts=jnp.zeros((b, cfg.vocab_size), jnp.int32),
            keys=key_data,
            settings=RowSettings.zeros(b),
        )
        # Committed where every step's outputs will live, so each shape compiles once.
        mesh = self.model.mesh
        if mesh is None:
            return jax.device_put(state, jax.devices()[0])
        state = jax.device_put(
            state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        )
        kv = kv_cache_sharding(mesh, cfg, b)  # k/v laid out like the model's K heads
        cache = KVCache(
            k=jax.device_put(state.cache.k, kv),
            v=jax.device_put(state.cache.v, kv),
            lengths=state.cache.lengths,
        )
        return dataclasses.replace(state, cache=cache)

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
        in_flight: tuple[Draw, list[SequenceRequest | None]] | None = None
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
                self._prefill(group, slots, want_prompt)
        self._admitting = []

    def _prefill(self, group: list[SequenceRequest], slots: list[int], want_prompt: bool) -> None:
        # One row, or all B: two compiled shapes per prompt bucket (a few idle rows cost less
        # than a compile per batch size on a small model; the rows run in one call).
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
        self._state, draw, prompt = _prefill(
            self.model.params,
            self.model.rope,
            self._state,
            jnp.asarray(tokens),
            jnp.asarray(lengths),
            jnp.asarray(slot_ids),
            settings,
            jnp.asarray(seeds),
            jnp.asarray(choices),
            apply_fn=self._apply,
            dtype=self.model.dtype,
            prompt_logprobs=want_prompt,
        )
        draw, prompt = jax.device_get((draw, prompt))
        for i, seq in enumerate(group):
            prompt_tokens = None
            if prompt is not None:
                given, top_ids, top_lp = prompt
                prompt_tokens = tuple(
                    TokenInfo(
                        tok,
                        None if j == 0 else float(given[i, j]),
                        () if j == 0 else _top(top_ids[i, j], top_lp[i, j], seq.params.logprobs),
                        0,
                    )
                    for j, tok in enumerate(seq.prompt)
                )
            with self._cv:
                self._slots[slots[i]] = seq
            if seq.params.max_tokens == 0:  # nothing to generate (echo scoring)
                self._finish(seq, slots[i], FINISH_LENGTH, prompt_tokens=prompt_tokens)
            else:
                self._deliver(seq, slots[i], draw, i, prompt_tokens)

    def _launch(self) -> tuple[Draw, list[SequenceRequest | None]]:
        """Dispatches one decode step (not waited for); returns its draw and the slots'
        sequences at that moment."""
        seqs = list(self._slots)
        active = np.array([s is not None for s in seqs])
        self._state, draw = _decode_step(
            self.model.params,
            self.model.rope,
            self._state,
            jnp.asarray(active),
            apply_fn=self._apply,
            dtype=self.model.dtype,
        )
        return draw, seqs

    def _collect(self, draw: Draw, seqs: list[SequenceRequest | None]) -> None:
        """Hands a step's tokens to the sequences still in the slots they had then."""
        draw = jax.device_get(draw)
        for slot, seq in enumerate(seqs):
            if seq is not None and self._slots[slot] is seq:
                self._deliver(seq, slot, draw, slot, None)

    def _deliver(
        self,
        seq: SequenceRequest,
        slot: int,
        draw: Draw,
        row: int,
        prompt_tokens: tuple[TokenInfo, ...] | None,
    ) -> None:
        """Hands row ``row`` of ``draw`` to ``seq`` (in ``slot``); frees the slot when done."""
        if seq.cancelled:
            self._release(slot, seq, "cancelled")
            return
        now = time.perf_counter()
        if self.metrics is not None:
            if seq.last_token_at is None:
                self.metrics.first_token(now - seq.submitted_at)
            else:
                self.metrics.next_token(now - seq.last_token_at)
        seq.last_token_at = now
        seq.num_tokens += 1
        token = int(draw.token[row])
        p = seq.params
        infos: tuple[TokenInfo, ...] = ()
        if token in p.stop_ids:
            seq.text.finish()
            reason = FINISH_STOP
        else:
            offset = seq.text.push(token)
            if p.logprobs is not None:
                top = _top(draw.top_ids[row], draw.top_logprobs[row], p.logprobs)
                infos = (TokenInfo(token, float(draw.logprob[row]), top, offset),)
            if seq.text.stopped:
                reason = FINISH_STOP
            elif seq.num_tokens >= p.max_tokens:
                seq.text.finish()
                reason = FINISH_LENGTH
            else:
                reason = None
        if reason is None:
            seq.sink(Update(seq.index, seq.text.take(), infos, None, seq.num_tokens, prompt_tokens))
        else:
            self._finish(seq, slot, reason, infos, prompt_tokens)

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
