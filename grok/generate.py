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
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from grok.config import GrokConfig
from grok.errors import GenerationError
from grok.kv_cache import KVCache
from grok.sampling import Sampler
from grok.sharding import kv_cache_sharding

if TYPE_CHECKING:
    from grok.api import Model

# The smallest prompt / cache bucket: below this, padding costs less than a recompile would.
MIN_BUCKET = 16
# Seeds are fed to jax.random.key as uint32.
MAX_SEED = 2**32 - 1

FINISH_STOP = "stop"  # a stop token (end of sequence, chat separator ...) was sampled
FINISH_LENGTH = "length"  # max_new_tokens tokens were produced
FINISH_CONTEXT = "context"  # the last token sits at position P - 1: the context is full

TokenCallback = Callable[[int, int], None]


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
) -> DecodeState:
    """Runs the prompts [B, T] (row b valid up to ``lengths[b]``) into a fresh cache of
    ``cache_len`` slots and samples each row's first new token."""
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
    return _record(state, first, last, stop_mask, max_new, p)


@functools.partial(
    jax.jit,
    static_argnames=("apply_fn", "context", "sampler"),
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
) -> DecodeState:
    """Decode steps until every row is done or ``state.step`` reaches ``limit``."""

    def cond(s: DecodeState) -> jax.Array:
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        logits, cache = apply_fn(
            params, s.token[:, None], s.position[:, None], rope, s.cache, s.position + 1
        )  # [B, 1, V]
        token = _sample_rows(sampler, logits[:, 0], s.keys, s.num_new)  # [B]
        advanced = jnp.where(s.done, s.position, s.position + 1)  # the new token's position
        s = dataclasses.replace(s, cache=cache, position=advanced, step=s.step + 1)
        return _record(s, token, logits[:, 0], stop_mask, max_new, context)

    return jax.lax.while_loop(cond, body, state)


def _check_prompts(prompts: Any, vocab: int, context: int) -> list[list[int]]:
    """The prompts as lists of ints, or GenerationError / TokenizerError naming the bad one."""
    from grok.errors import TokenizerError

    if isinstance(prompts, jax.Array):
        prompts = np.asarray(prompts)
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence | np.ndarray):
        raise GenerationError(
            f"prompts must be a sequence of token-id sequences, got {type(prompts).__name__}"
        )
    if len(prompts) == 0:
        raise GenerationError("prompts is empty: give at least one prompt")
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str | bytes):
            raise GenerationError(f"prompt {i} is text: encode it with a tokenizer first")
        try:
            ids = [operator.index(t) for t in prompt]
        except TypeError:
            raise GenerationError(f"prompt {i} is not a sequence of int token ids") from None
        if not ids:
            raise GenerationError(f"prompt {i} is empty: a prompt needs at least one token")
        if len(ids) > context:
            raise GenerationError(
                f"prompt {i} has {len(ids)} tokens, more than the context "
                f"(max_position_embeddings = {context})"
            )
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise TokenizerError(
                f"prompt {i}: token id {bad[0]} is outside the model's vocabulary [0, {vocab})"
            )
        out.append(ids)
    return out


def _row_keys(seed: int | Sequence[int], batch: int) -> jax.Array:
    """[B] PRNG keys: ``fold_in(key(seed), b)`` for one seed, ``key(seed[b])`` for a list."""

    def check(s: Any, what: str) -> int:
        if isinstance(s, bool) or not isinstance(s, int | np.integer) or not 0 <= s <= MAX_SEED:
            raise GenerationError(f"{what} must be an int in [0, {MAX_SEED}], got {s!r}")
        return int(s)

    if isinstance(seed, Sequence | np.ndarray):
        if len(seed) != batch:
            raise GenerationError(f"got {len(seed)} seeds for {batch} prompts; give one per prompt")
        seeds = jnp.asarray([check(s, f"seed[{i}]") for i, s in enumerate(seed)], jnp.uint32)
        return jax.vmap(jax.random.key)(seeds)
    base = jax.random.key(check(seed, "seed"))
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(batch))


def generate(
    model: Model,
    prompts: Sequence[Sequence[int]],
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
      model: the model (parameters may be sharded over a mesh; nothing is moved to one device).
      prompts: B prompts of token ids, of any lengths in [1, P].
      max_new_tokens: the most new tokens per sequence (a stop token counts as one).
      sampler: how to pick tokens; default greedy.
      seed: one seed for the batch (row b uses ``fold_in(key(seed), b)``), or one per prompt
        (the same seed then gives a sequence the same tokens whatever batch it is in).
      stop_tokens: ids that end a sequence (pass the tokenizer's eos id, and the chat separator
        for chat); the stop token is not included in the result's tokens.
      on_token: called as ``on_token(b, token_id)`` for each kept new token, in order, as soon
        as it is on the host. With it, the decode loop returns to the host once per step.
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
    tokens = np.zeros((batch, prompt_len), np.int32)  # [B, T], right-padded with id 0
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = r
    keys = _row_keys(seed, batch)
    max_new = jnp.asarray(min(max_new_tokens, cache_len), jnp.int32)
    stop_mask_j = jnp.asarray(stop_mask)

    start = time.perf_counter()
    prefill_args = (
        model.params,
        model.rope,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        keys,
        max_new,
        stop_mask_j,
    )
    prefill_fn, prefill_compile_s = _compiled(
        _prefill,
        prefill_args,
        apply_fn=model._fns.apply,
        config=config,
        dtype=model.dtype,
        sampler=sampler,
        cache_len=cache_len,
        record_logits=return_logits,
        cache_sharding=None if model.mesh is None else kv_cache_sharding(model.mesh, config, batch),
    )
    state = prefill_fn(*prefill_args)
    emitted = np.zeros((batch,), np.int32)  # tokens already handed to on_token, per row

    def stream() -> bool:
        """Hands new tokens to on_token; returns whether every row is done."""
        num_new, token, done, nonfinite = jax.device_get(
            (state.num_new, state.token, state.done, state.nonfinite)
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
    limit = jnp.int32(1 if on_token is not None else cache_len)  # steps per decode call
    decode_fn, decode_compile_s = _compiled(
        _decode,
        (model.params, model.rope, state, limit, max_new, stop_mask_j),
        apply_fn=model._fns.apply,
        context=context,
        sampler=sampler,
    )
    if on_token is not None:
        step = 0
        while not finished:
            step += 1
            state = decode_fn(
                model.params, model.rope, state, jnp.int32(step), max_new, stop_mask_j
            )
            finished = stream()
    else:
        state = decode_fn(model.params, model.rope, state, limit, max_new, stop_mask_j)
    num_new, out, nonfinite = jax.device_get((state.num_new, state.out, state.nonfinite))
    _check_finite(nonfinite, num_new)
    recorded = None if state.logits is None else np.asarray(state.logits)
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
    "bucket_length",
    "generate",
]
