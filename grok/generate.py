"""Text generation: prefill the prompts into a KV cache, then decode one token per step.

Glossary: B batch, T prompt bucket length, S cache slots, V vocab, P max_position_embeddings.

How a batch runs:

- Prompts are right-padded to a bucket length T (a power of two, at least ``MIN_BUCKET``, at
  most P), so new prompt lengths reuse a compiled prefill. Row b's token i sits at position i
  and cache slot i; the padding after its n_b tokens is written to the cache too, but attention
  only ever sees slots < ``kv_lengths[b]``, and each decode step overwrites the next slot before
  it becomes visible. Padding therefore changes no sequence's logits.
- The cache has S slots, the bucket of (longest prompt + ``max_new_tokens``) capped at P.
- Prefill runs the model over [B, T], picks each row's logits at its last prompt token and
  samples the first new token. Decode then feeds one token per row per step inside a
  ``lax.while_loop`` (the whole loop is one jitted call, with the decode state, cache
  included, donated). With a streaming callback the loop is entered once per step, so the host
  sees each token as soon as it exists; nothing else is done on the host per token.
- Each row stops on its own: on a stop token (end of sequence, chat separator, ...), after
  ``max_new_tokens`` tokens, or when its last token sits at position P - 1 (the context is
  full). Finished rows still ride along in the batch; their outputs are frozen.
- Row b's draws use the key ``fold_in(key_b, i)`` for its i-th new token (the key rule of
  ``grok.decode``), where ``key_b`` is ``fold_in(key(seed), b)`` for one seed or
  ``key(seed[b])`` for one seed per row. The same seed gives the same tokens, and with
  per-row seeds a sequence gets the same tokens in any batch.

The prefill, the step and the loop are ``grok.decode``'s (shared with ``grok-serve``); this
module validates a call, plans its shapes, places its inputs, runs the compiled programs and
collects the result.

On a mesh that spans several processes (``grok.distributed``), every process calls
``generate`` with the same arguments. The prompts, lengths, keys and limits enter as global
arrays replicated over the mesh (each process builds its own devices' copies from the values
it holds); the KV cache stays split over the mesh; what the host reads after each call
(tokens, counts, done flags, recorded logits) is pinned replicated inside the compiled
programs, so every process reads it from its own devices and no gather runs on the host.
Every process gets the same ``GenerationResult``, and ``on_token`` runs on every process
with the same tokens (print from ``jax.process_index() == 0`` only, as ``grok-sample``
does).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from grok import decode
from grok.config import GrokConfig
from grok.decode import (
    FINISH_CONTEXT,
    FINISH_LENGTH,
    FINISH_STOP,
    MAX_SEED,
    MIN_BUCKET,
    ApplyFn,
    DecodeState,
    DenseCache,
    FixedSampler,
    bucket_length,
)
from grok.distributed import to_global, to_host
from grok.errors import GenerationError
from grok.memory_plan import check_generation_fits
from grok.rope import RopeTable
from grok.sampling import Sampler
from grok.sharding import kv_cache_sharding
from grok.tokens import check_token_ids

TokenCallback = Callable[[int, int], None]

Params = Mapping[str, Mapping[str, Any]]  # the Haiku tree: {module: {name: array}}


class ModelLike(Protocol):
    """What ``generate`` needs of a model; ``grok.Model`` is one.

    ``apply_fn`` is the pure (un-jitted) apply function; it is a static argument of the
    compiled prefill and decode, so it must be hashable and the same object from call to
    call (``grok.model.forward_fns`` caches it per config).
    """

    @property
    def config(self) -> GrokConfig: ...

    @property
    def params(self) -> Params: ...

    @property
    def dtype(self) -> jnp.dtype: ...

    @property
    def mesh(self) -> Mesh | None: ...

    @property
    def rope(self) -> RopeTable: ...

    @property
    def apply_fn(self) -> ApplyFn: ...


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What ``generate`` produced.

    Attributes:
      tokens: the new tokens of each sequence (a stop token that ended it is not included).
      finish_reasons: per sequence, ``"stop"``, ``"length"`` or ``"context"``.
      stop_tokens: per sequence, the stop token that ended it, or None.
      prompt_lengths: the number of prompt tokens of each sequence.
      time_to_first_token_s: seconds from the call to the first tokens being on the host
        (prefill, including any compilation).
      decode_time_s: seconds spent in the decode steps after that (including compiling the
        decode loop, the first time these shapes and this sampler are seen).
      num_decode_tokens: tokens sampled by decode steps (all sequences; stop tokens counted,
        the first token of each sequence, which prefill samples, not).
      logits: when asked for, per sequence the float32 logits [n_i, V] that each sampled token
        (stop token included) was drawn from; else None.
      prefill_compile_s, decode_compile_s: the parts of ``time_to_first_token_s`` and
        ``decode_time_s`` spent tracing and compiling (or loading compiled executables from
        the persistent cache, see ``grok.compile_cache``); 0 once these shapes are compiled.
    """

    tokens: list[list[int]]
    finish_reasons: list[str]
    stop_tokens: list[int | None]
    prompt_lengths: list[int]
    time_to_first_token_s: float
    decode_time_s: float
    num_decode_tokens: int
    logits: list[np.ndarray] | None = None
    prefill_compile_s: float = 0.0
    decode_compile_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode throughput over the whole batch (0 when nothing was decoded)."""
        if self.num_decode_tokens == 0 or self.decode_time_s <= 0:
            return 0.0
        return self.num_decode_tokens / self.decode_time_s

    @property
    def compile_s(self) -> float:
        """Seconds of this call spent compiling (prefill and decode)."""
        return self.prefill_compile_s + self.decode_compile_s


# -- the compiled programs -------------------------------------------------------------------


@functools.partial(
    jax.jit,
    static_argnames=("apply_fn", "sampler", "store", "cache_len", "record_logits", "host_sharding"),
)
def _prefill(
    params: Any,
    rope: Any,
    tokens: jax.Array,
    lengths: jax.Array,
    keys: jax.Array,
    max_new: jax.Array,
    stop_mask: jax.Array,
    *,
    apply_fn: ApplyFn,
    sampler: FixedSampler,
    store: DenseCache,
    cache_len: int,
    record_logits: bool,
    host_sharding: jax.sharding.Sharding | None = None,
) -> DecodeState:
    """Prefills the prompts [B, T] (row b valid up to ``lengths[b]``) into a fresh cache of
    ``cache_len`` slots and samples each row's first new token (``grok.decode.begin``); the
    state pinned (``grok.decode.pin``: k/v to ``store.sharding``, the rest to
    ``host_sharding``)."""
    hooks = {"apply_fn": apply_fn, "sampler": sampler, "store": store}
    inputs = (tokens, lengths, keys, max_new, stop_mask)
    state = decode.begin(
        params, rope, *inputs, cache_len=cache_len, record_logits=record_logits, **hooks
    )
    return decode.pin(state, store.sharding, host_sharding)


@functools.partial(
    jax.jit,
    static_argnames=("apply_fn", "sampler", "store", "host_sharding"),
    donate_argnames=("state",),
)
def _decode(
    params: Any,
    rope: Any,
    state: DecodeState,
    limit: jax.Array,
    max_new: jax.Array,
    stop_mask: jax.Array,
    *,
    apply_fn: ApplyFn,
    sampler: FixedSampler,
    store: DenseCache,
    host_sharding: jax.sharding.Sharding | None = None,
) -> DecodeState:
    """Decode steps until every row is done or ``state.step`` reaches ``limit``
    (``grok.decode.run``), the state pinned as ``_prefill`` pins it."""
    hooks = {"apply_fn": apply_fn, "sampler": sampler, "store": store}
    state = decode.run(params, rope, state, limit, max_new, stop_mask, **hooks)
    return decode.pin(state, store.sharding, host_sharding)


# The two programs by name, for compiling them without running (``grok.tpu_plan``).
PREFILL_PROGRAM = _prefill
DECODE_PROGRAM = _decode


# -- validate and plan -----------------------------------------------------------------------


def _check_prompts(prompts: Any, vocab: int, context: int) -> list[list[int]]:
    """The prompts as lists of ints, or GenerationError / TokenizerError naming the bad one."""
    if isinstance(prompts, jax.Array):
        prompts = np.asarray(prompts)
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence | np.ndarray):
        raise GenerationError(
            f"prompts must be a sequence of token-id sequences, got {type(prompts).__name__}"
        )
    if isinstance(prompts, np.ndarray) and prompts.ndim != 2 and prompts.dtype != object:
        raise GenerationError(
            f"prompts must be a sequence of token-id sequences ([B, T] for an array), got an "
            f"array of shape {prompts.shape}"
        )
    if len(prompts) == 0:
        raise GenerationError("prompts is empty: give at least one prompt")
    return [
        check_token_ids(
            prompt, vocab_size=vocab, context=context, ndim=1, what=f"prompt {i}"
        ).tolist()
        for i, prompt in enumerate(prompts)
    ]


def _check_sampler(sampler: Any) -> Sampler:
    """The sampler to run (default greedy; every greedy setting shares one compiled loop)."""
    sampler = Sampler() if sampler is None else sampler
    if not isinstance(sampler, Sampler):
        raise GenerationError(f"sampler must be a grok.sampling.Sampler, got {sampler!r}")
    return Sampler() if sampler.is_greedy else sampler


def _check_max_new(max_new_tokens: Any) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer):
        raise GenerationError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be an int >= 0, got {max_new_tokens}")
    return int(max_new_tokens)


def _stop_mask(stop_tokens: Sequence[int], vocab: int) -> np.ndarray:
    """bool [V]: the stop tokens, each checked to be an id."""
    mask = np.zeros((vocab,), bool)
    for s in stop_tokens:
        if isinstance(s, bool) or not isinstance(s, int | np.integer) or not 0 <= s < vocab:
            raise GenerationError(f"stop token {s!r} is not an id in [0, {vocab})")
        mask[s] = True
    return mask


def _row_keys(seed: int | Sequence[int], batch: int) -> np.ndarray:
    """[B, 2] uint32 raw data of the rows' keys (``grok.decode.sequence_keys``):
    ``fold_in(key(seed), b)`` for one seed, ``key(seed[b])`` for a list. Host data, so that
    on several processes it can enter as a global array like the other inputs."""

    def check(s: Any, what: str) -> int:
        if isinstance(s, bool) or not isinstance(s, int | np.integer) or not 0 <= s <= MAX_SEED:
            raise GenerationError(f"{what} must be an int in [0, {MAX_SEED}], got {s!r}")
        return int(s)

    if isinstance(seed, Sequence | np.ndarray):
        if len(seed) != batch:
            raise GenerationError(f"got {len(seed)} seeds for {batch} prompts; give one per prompt")
        seeds = jnp.asarray([check(s, f"seed[{i}]") for i, s in enumerate(seed)], jnp.uint32)
        keys = decode.sequence_keys(seeds)
    else:
        seeds = jnp.full((batch,), check(seed, "seed"), jnp.uint32)
        keys = decode.sequence_keys(seeds, jnp.arange(batch, dtype=jnp.uint32))
    return np.asarray(jax.random.key_data(keys))


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A checked call, in host values: what runs, in which shapes.

    Attributes:
      rows: the prompts' token ids.
      tokens: [B, T] int32, the prompts right-padded with id 0 to the bucket T.
      lengths: [B] int32, the prompts' lengths.
      cache_len: S, the cache's slots per row.
      stop_mask: [V] bool, the stop tokens.
      keys: [B, 2] uint32, the rows' raw key data.
      sampler: the (checked) sampler.
      max_new_tokens: the most new tokens per row.
    """

    rows: list[list[int]]
    tokens: np.ndarray
    lengths: np.ndarray
    cache_len: int
    stop_mask: np.ndarray
    keys: np.ndarray
    sampler: Sampler
    max_new_tokens: int


def _plan(
    model: ModelLike,
    prompts: Any,
    *,
    max_new_tokens: Any,
    sampler: Any,
    seed: Any,
    stop_tokens: Sequence[int],
) -> _Plan:
    """Checks the arguments and fixes the shapes (GenerationError / TokenizerError naming
    the bad argument). The memory plan refuses a KV cache that cannot fit the devices
    (MemoryPlanError): first for rows of one token, before the rows are read, then for the
    exact cache length."""
    config = model.config
    context, vocab = config.max_position_embeddings, config.vocab_size
    sampler = _check_sampler(sampler)
    max_new_tokens = _check_max_new(max_new_tokens)
    fits = functools.partial(
        check_generation_fits, config, model.params, model.mesh, dtype=model.dtype
    )
    if isinstance(prompts, Sequence) or getattr(prompts, "ndim", 0) >= 1:  # before reading rows
        fits(batch=len(prompts), context=bucket_length(min(context, 1 + max_new_tokens), context))
    rows = _check_prompts(prompts, vocab, context)
    stop_mask = _stop_mask(stop_tokens, vocab)
    lengths = np.array([len(r) for r in rows], np.int32)  # [B]
    longest = int(lengths.max())
    prompt_len = bucket_length(longest, context)  # T
    cache_len = bucket_length(max(prompt_len, min(context, longest + max_new_tokens)), context)
    fits(batch=len(rows), context=cache_len)
    tokens = np.zeros((len(rows), prompt_len), np.int32)  # [B, T], right-padded with id 0
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = r
    return _Plan(
        rows=rows,
        tokens=tokens,
        lengths=lengths,
        cache_len=cache_len,
        stop_mask=stop_mask,
        keys=_row_keys(seed, len(rows)),
        sampler=sampler,
        max_new_tokens=max_new_tokens,
    )


# -- place and run ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Placed:
    """A plan's inputs on the devices, ``put`` (host data as an input: on a mesh a global array
    replicated over it, built per process from the same host values), and the compiled
    programs' static arguments (apply_fn, sampler, store, host_sharding)."""

    tokens: jax.Array  # [B, T]
    lengths: jax.Array  # [B]
    keys: jax.Array  # [B, 2]
    max_new: jax.Array  # []
    stop_mask: jax.Array  # [V]
    put: Callable[[np.ndarray], jax.Array]
    static: dict[str, Any]


def _place(model: ModelLike, plan: _Plan) -> _Placed:
    """On a mesh every input is replicated over it, and so is what the host reads back; the
    KV cache is split like the model's K heads."""
    mesh, config = model.mesh, model.config
    replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    cache_sharding = None if mesh is None else kv_cache_sharding(mesh, config, len(plan.rows))

    def put(value: np.ndarray) -> jax.Array:
        return jnp.asarray(value) if replicated is None else to_global(value, replicated)

    return _Placed(
        tokens=put(plan.tokens),
        lengths=put(plan.lengths),
        keys=put(plan.keys),
        max_new=put(np.int32(min(plan.max_new_tokens, plan.cache_len))),
        stop_mask=put(plan.stop_mask),
        put=put,
        static={
            "apply_fn": model.apply_fn,
            "sampler": FixedSampler(plan.sampler),
            "store": DenseCache(config, model.dtype, cache_sharding, model.apply_fn.kernels),
            "host_sharding": replicated,
        },
    )


class _Stream:
    """Hands each row's new tokens to ``on_token`` (stop tokens withheld) as they reach the
    host; one decode step adds at most one token per row."""

    def __init__(self, on_token: TokenCallback, stop_mask: np.ndarray, batch: int):
        self.on_token = on_token
        self.stop_mask = stop_mask
        self.emitted = np.zeros((batch,), np.int32)  # tokens already handed out, per row

    def __call__(self, state: DecodeState) -> bool:
        """Hands out the new tokens of ``state``; returns whether every row is done."""
        rows = state.rows
        num_new, token, done, nonfinite = (
            to_host(x) for x in (rows.num_new, rows.token, state.done, state.nonfinite)
        )
        decode.check_finite(nonfinite, num_new)
        for b in np.flatnonzero(num_new > self.emitted):
            self.emitted[b] = num_new[b]
            if not self.stop_mask[token[b]]:
                self.on_token(int(b), int(token[b]))
        return bool(done.all())


@dataclasses.dataclass(frozen=True)
class _Outcome:
    """What a run leaves on the host: tokens [B] counts, tokens [B, S], logits [B, S, V] or
    None, and its timings (see ``GenerationResult``)."""

    num_new: np.ndarray
    out: np.ndarray
    logits: np.ndarray | None
    time_to_first_token_s: float
    decode_time_s: float
    prefill_compile_s: float
    decode_compile_s: float


def _run(
    model: ModelLike,
    plan: _Plan,
    placed: _Placed,
    on_token: TokenCallback | None,
    return_logits: bool,
) -> _Outcome:
    """Prefill, then decode: in one call, or with ``on_token`` one call per step."""
    start = time.perf_counter()
    params, rope, put = model.params, model.rope, placed.put
    inputs = (placed.tokens, placed.lengths, placed.keys, placed.max_new, placed.stop_mask)
    prefill_fn, prefill_compile_s = _compiled(
        _prefill,
        (params, rope, *inputs),
        cache_len=plan.cache_len,
        record_logits=return_logits,
        **placed.static,
    )
    state = prefill_fn(params, rope, *inputs)
    stream = None if on_token is None else _Stream(on_token, plan.stop_mask, len(plan.rows))
    if stream is not None:
        finished = stream(state)
    else:
        jax.block_until_ready(state.rows.token)
    first_at = time.perf_counter()

    limits = (placed.max_new, placed.stop_mask)
    limit = put(np.int32(1 if stream is not None else plan.cache_len))  # steps per call
    decode_fn, decode_compile_s = _compiled(
        _decode, (params, rope, state, limit, *limits), **placed.static
    )
    if stream is not None:
        step = 0
        while not finished:
            step += 1
            state = decode_fn(params, rope, state, put(np.int32(step)), *limits)
            finished = stream(state)
    else:
        state = decode_fn(params, rope, state, limit, *limits)
    num_new, out, nonfinite = (to_host(x) for x in (state.rows.num_new, state.out, state.nonfinite))
    decode.check_finite(nonfinite, num_new)
    recorded = None if state.logits is None else to_host(state.logits)
    end = time.perf_counter()
    return _Outcome(
        num_new=num_new,
        out=out,
        logits=recorded,
        time_to_first_token_s=first_at - start,
        decode_time_s=end - first_at,
        prefill_compile_s=prefill_compile_s,
        decode_compile_s=decode_compile_s,
    )


def _compiled(fn: Any, args: tuple, **static: Any) -> tuple[Callable, float]:
    """``fn`` (a jitted function) compiled for ``args`` and the static keyword arguments, and
    the seconds that took: tracing, lowering and XLA's compile, or loading the executable from
    the persistent cache (``grok.compile_cache``). JAX's own caches make a repeated call cost
    microseconds, so this is 0.0 for shapes already compiled in this process."""
    begin = time.perf_counter()
    executable = fn.lower(*args, **static).compile()
    return executable, time.perf_counter() - begin


# -- collect ---------------------------------------------------------------------------------


def _collect(model: ModelLike, plan: _Plan, outcome: _Outcome) -> GenerationResult:
    """The result: each row's kept tokens, why it ended, its stop token, its logits."""
    context = model.config.max_position_embeddings
    tokens, reasons, stops, logits = [], [], [], []
    for b, prompt in enumerate(plan.rows):
        n = int(outcome.num_new[b])
        seq = [int(t) for t in outcome.out[b, :n]]
        stop = seq[-1] if seq and plan.stop_mask[seq[-1]] else None
        reason = decode.finish_reason(
            stopped=stop is not None,
            num_new=n,
            max_new=plan.max_new_tokens,
            context_full=len(prompt) + n >= context,
        )
        tokens.append(seq if stop is None else seq[:-1])
        reasons.append(reason)
        stops.append(stop)
        if outcome.logits is not None:
            logits.append(outcome.logits[b, :n])
    return GenerationResult(
        tokens=tokens,
        finish_reasons=reasons,
        stop_tokens=stops,
        prompt_lengths=[len(r) for r in plan.rows],
        time_to_first_token_s=outcome.time_to_first_token_s,
        decode_time_s=outcome.decode_time_s,
        num_decode_tokens=int(np.maximum(outcome.num_new - 1, 0).sum()),
        logits=logits if outcome.logits is not None else None,
        prefill_compile_s=outcome.prefill_compile_s,
        decode_compile_s=outcome.decode_compile_s,
    )


def generate(
    model: ModelLike,
    prompts: Sequence[Sequence[int]] | np.ndarray,
    *,
    max_new_tokens: int,
    sampler: Sampler | None = None,
    seed: int | Sequence[int] = 0,
    stop_tokens: Sequence[int] = (),
    on_token: TokenCallback | None = None,
    return_logits: bool = False,
) -> GenerationResult:
    """Continues each prompt until it stops (see the module docstring).

    Args:
      model: the model (parameters may be sharded over a mesh, one that may span processes;
        nothing is moved to one device).
      prompts: B prompts of token ids, of any lengths in [1, P].
      max_new_tokens: the most new tokens per sequence (a stop token counts as one).
      sampler: how to pick tokens; default greedy.
      seed: one seed for the batch (row b uses ``fold_in(key(seed), b)``), or one per prompt
        (the same seed then gives a sequence the same tokens whatever batch it is in).
      stop_tokens: ids that end a sequence (pass the tokenizer's eos id, and the chat separator
        for chat); the stop token is not included in the result's tokens.
      on_token: called as ``on_token(b, token_id)`` for each kept new token, in order, as soon
        as it is on the host. With it, the decode loop returns to the host once per step.
        On several processes it runs on every process, with the same tokens.
      return_logits: also return the logits of every sampled token (float32 [B, S, V] on the
        device while generating: for tests and small vocabularies).
    Returns:
      a ``GenerationResult``.
    """
    plan = _plan(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        sampler=sampler,
        seed=seed,
        stop_tokens=stop_tokens,
    )
    outcome = _run(model, plan, _place(model, plan), on_token, return_logits)
    return _collect(model, plan, outcome)


__all__ = [
    "FINISH_CONTEXT",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "MAX_SEED",
    "MIN_BUCKET",
    "DecodeState",
    "GenerationResult",
    "ModelLike",
    "TokenCallback",
    "bucket_length",
    "generate",
]
