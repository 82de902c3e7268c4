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
- Row b's draws use the key ``fold_in(key_b, i)`` for its i-th new token, where ``key_b``
  comes from the seed and the row (or from the row's own seed). The same seed gives the same
  tokens, and with per-row seeds a sequence gets the same tokens in any batch.

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

from grok.config import GrokConfig
from grok.distributed import to_global, to_host
from grok.errors import GenerationError
from grok.kv_cache import KVCache
from grok.memory_plan import check_generation_fits
from grok.rope import RopeTable
from grok.sampling import Sampler
from grok.sharding import kv_cache_sharding
from grok.tokens import check_token_ids

# The smallest prompt / cache bucket: below this, padding costs less than a recompile would.
MIN_BUCKET = 16
# Seeds are fed to jax.random.key as uint32.
MAX_SEED = 2**32 - 1

FINISH_STOP = "stop"  # a stop token (end of sequence, chat separator ...) was sampled
FINISH_LENGTH = "length"  # max_new_tokens tokens were produced
FINISH_CONTEXT = "context"  # the last token sits at position P - 1: the context is full

TokenCallback = Callable[[int, int], None]

# ``apply(params, tokens [B, T], positions [B, T], rope, cache, kv_lengths [B], logits_at [B])``
# -> (logits [B, T or 1, V] float32, cache): the Haiku apply of ``grok.model.forward_fns``.
ApplyFn = Callable[..., tuple[jax.Array, KVCache | None]]
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


def bucket_length(n: int, limit: int) -> int:
    """The bucket that holds ``n`` tokens: the smallest power of two >= max(n, MIN_BUCKET),
    capped at ``limit`` (P). ``n`` must be <= ``limit``."""
    if n > limit:
        raise GenerationError(f"{n} tokens do not fit in a context of {limit}")
    return min(limit, max(MIN_BUCKET, 1 << max(0, n - 1).bit_length()))


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything the decode loop carries (a pytree; donated to each decode call).

    Attributes:
      cache: the KV cache, [L, B, S, K, H] keys and values.
      token: [B] int32, each row's last sampled token (the next step's input).
      position: [B] int32, the position of ``token`` (not yet in the cache).
      num_new: [B] int32, tokens sampled so far, a stop token included.
      done: [B] bool, rows that have stopped.
      out: [B, S] int32, the sampled tokens (row b's first ``num_new[b]`` are valid).
      logits: [B, S, V] float32 logits of each sampled token, or None when not recorded.
      keys: [B] PRNG keys, one per row.
      step: [] int32, decode steps run so far.
      nonfinite: [B] bool, rows whose logits held a NaN or an infinity (such a row stops;
        ``generate`` then raises GenerationError instead of returning what argmax made of it).
    """

    cache: KVCache
    token: jax.Array
    position: jax.Array
    num_new: jax.Array
    done: jax.Array
    out: jax.Array
    logits: jax.Array | None
    keys: jax.Array
    step: jax.Array
    nonfinite: jax.Array


def _sample_rows(
    sampler: Sampler, logits: jax.Array, keys: jax.Array, counters: jax.Array
) -> jax.Array:
    """One token per row, row b drawn with ``fold_in(keys[b], counters[b])``: [B, V] -> [B]."""
    if sampler.is_greedy:
        return sampler.sample(logits, keys[0])  # the key is unused
    step_keys = jax.vmap(jax.random.fold_in)(keys, counters)  # [B]
    return jax.vmap(lambda row, key: sampler.sample(row[None], key)[0])(logits, step_keys)


def _record(
    state: DecodeState,
    token: jax.Array,
    logits: jax.Array,
    stop_mask: jax.Array,
    max_new: jax.Array,
    context: int,
) -> DecodeState:
    """Appends ``token`` [B] (drawn from ``logits`` [B, V]) to every row not done; decides
    which rows are done now."""
    active = ~state.done  # [B]
    nonfinite = state.nonfinite | (active & ~jnp.all(jnp.isfinite(logits), axis=-1))  # [B]
    rows = jnp.arange(token.shape[0])
    slot = jnp.where(active, state.num_new, state.out.shape[1])  # out of range -> dropped
    out = state.out.at[rows, slot].set(token, mode="drop")
    recorded = state.logits
    if recorded is not None:
        recorded = recorded.at[rows, slot].set(logits.astype(jnp.float32), mode="drop")
    num_new = state.num_new + active.astype(jnp.int32)
    # A token sampled during a step sits one past the fed token; the first one (prefill's)
    # arrives with its position already set.
    position = state.position
    done = (
        state.done
        | stop_mask[token]
        | (num_new >= max_new)
        | (position >= context - 1)  # the new token takes the last position of the context
        | nonfinite
    )
    return dataclasses.replace(
        state,
        token=jnp.where(active, token, state.token),
        num_new=num_new,
        done=done,
        out=out,
        logits=recorded,
        nonfinite=nonfinite,
    )


def _pin_state(
    state: DecodeState,
    cache_sharding: jax.sharding.Sharding | None,
    host_sharding: jax.sharding.Sharding | None,
) -> DecodeState:
    """Pins the decode state's layout on a mesh: k/v to ``cache_sharding``, everything else
    (what the host reads, and the keys) to ``host_sharding``, replicated over the mesh so
    that every process holds it whole. Prefill's output and decode's input and output then
    share one layout, so decode compiles once. None: left to the compiler."""

    def pin(x: Any, sharding: jax.sharding.Sharding | None) -> Any:
        if x is None or sharding is None:
            return x
        return jax.lax.with_sharding_constraint(x, sharding)

    cache = state.cache
    k, v = pin(cache.k, cache_sharding), pin(cache.v, cache_sharding)
    fields = {
        f.name: pin(getattr(state, f.name), host_sharding)
        for f in dataclasses.fields(state)
        if f.name != "cache"
    }
    cache = dataclasses.replace(cache, k=k, v=v, lengths=pin(cache.lengths, host_sharding))
    return dataclasses.replace(state, cache=cache, **fields)


@functools.partial(
    jax.jit,
    static_argnames=(
        "apply_fn",
        "config",
        "dtype",
        "sampler",
        "cache_len",
        "record_logits",
        "cache_sharding",
        "host_sharding",
    ),
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
    apply_fn: Callable,
    config: GrokConfig,
    dtype: jnp.dtype,
    sampler: Sampler,
    cache_len: int,
    record_logits: bool,
    cache_sharding: jax.sharding.Sharding | None = None,
    host_sharding: jax.sharding.Sharding | None = None,
) -> DecodeState:
    """Runs the prompts [B, T] (row b valid up to ``lengths[b]``) into a fresh cache of
    ``cache_len`` slots and samples each row's first new token. ``cache_sharding`` and
    ``host_sharding``: see ``_pin_state``."""
    b, t = tokens.shape
    p = config.max_position_embeddings
    cache = KVCache.create(config, b, cache_len, dtype)
    if cache_sharding is not None:  # k/v [L, B, S, K, H] laid out like the model's K heads
        k, v = (jax.lax.with_sharding_constraint(x, cache_sharding) for x in (cache.k, cache.v))
        cache = KVCache(k=k, v=v, lengths=cache.lengths)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))  # [B, T]
    # Only each row's last prompt position needs the head: [B, 1, V], not [B, T, V].
    logits, cache = apply_fn(params, tokens, positions, rope, cache, lengths, lengths - 1)
    last = logits[:, 0]  # [B, V]
    zeros = jnp.zeros((b,), jnp.int32)
    first = _sample_rows(sampler, last, keys, zeros)  # [B]
    recorded = None
    if record_logits:
        recorded = jnp.zeros((b, cache_len, config.vocab_size), jnp.float32)  # [B, S, V]
    state = DecodeState(
        cache=cache,
        token=zeros,
        position=jnp.minimum(lengths, cache_len - 1),  # where the first new token sits
        num_new=zeros,
        # A prompt that fills the context, or max_new_tokens 0, leaves nothing to sample.
        done=(lengths >= p) | (max_new <= 0),
        out=jnp.zeros((b, cache_len), jnp.int32),
        logits=recorded,
        keys=keys,
        step=jnp.zeros((), jnp.int32),
        nonfinite=jnp.zeros((b,), jnp.bool_),
    )
    state = _record(state, first, last, stop_mask, max_new, p)
    return _pin_state(state, cache_sharding, host_sharding)


@functools.partial(
    jax.jit,
    static_argnames=("apply_fn", "context", "sampler", "cache_sharding", "host_sharding"),
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
    apply_fn: Callable,
    context: int,
    sampler: Sampler,
    cache_sharding: jax.sharding.Sharding | None = None,
    host_sharding: jax.sharding.Sharding | None = None,
) -> DecodeState:
    """Decode steps until every row is done or ``state.step`` reaches ``limit``.
    ``cache_sharding`` and ``host_sharding``: see ``_pin_state``."""

    def cond(s: DecodeState) -> jax.Array:
        return (s.step < limit) & ~jnp.all(s.done)

    # The loop carries the cache in the kernels' carried form (``Kernels.carry``).
    dtype, kernels = state.cache.k.dtype, apply_fn.kernels

    def body(s: DecodeState) -> DecodeState:
        logits, cache = apply_fn(
            params,
            s.token[:, None],
            s.position[:, None],
            rope,
            kernels.uncarry(s.cache, dtype),
            s.position + 1,
        )  # [B, 1, V]
        token = _sample_rows(sampler, logits[:, 0], s.keys, s.num_new)  # [B]
        advanced = jnp.where(s.done, s.position, s.position + 1)  # the new token's position
        s = dataclasses.replace(s, cache=kernels.carry(cache), position=advanced, step=s.step + 1)
        return _record(s, token, logits[:, 0], stop_mask, max_new, context)

    state = dataclasses.replace(state, cache=kernels.carry(state.cache))
    final = jax.lax.while_loop(cond, body, state)
    final = dataclasses.replace(final, cache=kernels.uncarry(final.cache, dtype))
    return _pin_state(final, cache_sharding, host_sharding)


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


def _row_keys(seed: int | Sequence[int], batch: int) -> np.ndarray:
    """[B, 2] uint32 data of the PRNG keys (``jax.random.wrap_key_data`` makes them keys):
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
        keys = jax.vmap(jax.random.key)(seeds)
    else:
        base = jax.random.key(check(seed, "seed"))
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(batch))
    return np.asarray(jax.random.key_data(keys))


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
    config = model.config
    context, vocab = config.max_position_embeddings, config.vocab_size
    sampler = Sampler() if sampler is None else sampler
    if not isinstance(sampler, Sampler):
        raise GenerationError(f"sampler must be a grok.sampling.Sampler, got {sampler!r}")
    if sampler.is_greedy:
        sampler = Sampler()  # every greedy setting shares one compiled loop
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer):
        raise GenerationError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be an int >= 0, got {max_new_tokens}")
    # The memory plan refuses a KV cache that cannot fit the devices (MemoryPlanError): first
    # for rows of one token, before the rows are read, then for the exact cache length.
    fits_check = functools.partial(
        check_generation_fits, config, model.params, model.mesh, dtype=model.dtype
    )
    if isinstance(prompts, Sequence) or getattr(prompts, "ndim", 0) >= 1:  # before reading rows
        fits_check(
            batch=len(prompts), context=bucket_length(min(context, 1 + max_new_tokens), context)
        )
    rows = _check_prompts(prompts, vocab, context)
    stop_mask = np.zeros((vocab,), bool)  # [V]
    for s in stop_tokens:
        if isinstance(s, bool) or not isinstance(s, int | np.integer) or not 0 <= s < vocab:
            raise GenerationError(f"stop token {s!r} is not an id in [0, {vocab})")
        stop_mask[s] = True

    batch = len(rows)
    lengths = np.array([len(r) for r in rows], np.int32)  # [B]
    longest = int(lengths.max())
    prompt_len = bucket_length(longest, context)  # T
    cache_len = bucket_length(max(prompt_len, min(context, longest + max_new_tokens)), context)
    fits_check(batch=batch, context=cache_len)
    tokens = np.zeros((batch, prompt_len), np.int32)  # [B, T], right-padded with id 0
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = r
    mesh = model.mesh
    # On a mesh every input is a global array replicated over it (built per process from the
    # same host values), and so is what the host reads back.
    replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    cache_sharding = None if mesh is None else kv_cache_sharding(mesh, config, batch)

    def put(value: np.ndarray) -> jax.Array:
        return jnp.asarray(value) if replicated is None else to_global(value, replicated)

    keys = jax.random.wrap_key_data(put(_row_keys(seed, batch)))  # [B]
    max_new = put(np.int32(min(max_new_tokens, cache_len)))
    stop_mask_j = put(stop_mask)

    start = time.perf_counter()
    prefill_args = (
        model.params,
        model.rope,
        put(tokens),
        put(lengths),
        keys,
        max_new,
        stop_mask_j,
    )
    prefill_fn, prefill_compile_s = _compiled(
        _prefill,
        prefill_args,
        apply_fn=model.apply_fn,
        config=config,
        dtype=model.dtype,
        sampler=sampler,
        cache_len=cache_len,
        record_logits=return_logits,
        cache_sharding=cache_sharding,
        host_sharding=replicated,
    )
    state = prefill_fn(*prefill_args)
    emitted = np.zeros((batch,), np.int32)  # tokens already handed to on_token, per row

    def stream() -> bool:
        """Hands new tokens to on_token; returns whether every row is done."""
        num_new, token, done, nonfinite = (
            to_host(x) for x in (state.num_new, state.token, state.done, state.nonfinite)
        )
        _check_finite(nonfinite, num_new)
        for b in range(batch):
            if num_new[b] > emitted[b]:  # at most one new token per step
                emitted[b] = num_new[b]
                if not stop_mask[token[b]]:
                    on_token(b, int(token[b]))
        return bool(done.all())

    if on_token is not None:
        finished = stream()
    else:
        jax.block_until_ready(state.token)
    first_at = time.perf_counter()
    limit = put(np.int32(1 if on_token is not None else cache_len))  # steps per decode call
    decode_fn, decode_compile_s = _compiled(
        _decode,
        (model.params, model.rope, state, limit, max_new, stop_mask_j),
        apply_fn=model.apply_fn,
        context=context,
        sampler=sampler,
        cache_sharding=cache_sharding,
        host_sharding=replicated,
    )
    if on_token is not None:
        step = 0
        while not finished:
            step += 1
            state = decode_fn(
                model.params, model.rope, state, put(np.int32(step)), max_new, stop_mask_j
            )
            finished = stream()
    else:
        state = decode_fn(model.params, model.rope, state, limit, max_new, stop_mask_j)
    num_new, out, nonfinite = (to_host(x) for x in (state.num_new, state.out, state.nonfinite))
    _check_finite(nonfinite, num_new)
    recorded = None if state.logits is None else to_host(state.logits)
    end = time.perf_counter()

    tokens_out, reasons, stops, logits_out = [], [], [], []
    for b in range(batch):
        n = int(num_new[b])
        seq = [int(t) for t in out[b, :n]]
        stop = seq[-1] if seq and stop_mask[seq[-1]] else None
        if stop is not None:
            seq, reason = seq[:-1], FINISH_STOP
        elif n >= max_new_tokens:
            reason = FINISH_LENGTH
        else:
            reason = FINISH_CONTEXT
        tokens_out.append(seq)
        reasons.append(reason)
        stops.append(stop)
        if recorded is not None:
            logits_out.append(recorded[b, :n])
    return GenerationResult(
        tokens=tokens_out,
        finish_reasons=reasons,
        stop_tokens=stops,
        prompt_lengths=[len(r) for r in rows],
        time_to_first_token_s=first_at - start,
        decode_time_s=end - first_at,
        num_decode_tokens=int(np.maximum(num_new - 1, 0).sum()),
        logits=logits_out if recorded is not None else None,
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


def _check_finite(nonfinite: np.ndarray, num_new: np.ndarray) -> None:
    """GenerationError when some row's logits held a NaN or an infinity (checked on the host
    from the flag the decode loop carries, so a broken model never yields tokens silently)."""
    rows = np.flatnonzero(nonfinite)
    if rows.size:
        b = int(rows[0])
        raise GenerationError(
            f"the model produced non-finite logits (NaN or inf) for sequence {b} at its new "
            f"token {int(num_new[b])} ({rows.size} of {nonfinite.size} sequences affected): the "
            "weights or their dtype are broken (check the checkpoint, its scales and --dtype)"
        )


__all__ = [
    "FINISH_CONTEXT",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "MIN_BUCKET",
    "DecodeState",
    "GenerationResult",
    "ModelLike",
    "bucket_length",
    "generate",
]
