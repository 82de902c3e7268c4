"""The decode core: prefill into a KV cache, one decode step, the decode loop, and the rules
every caller of them follows (``grok.generate`` for a batch, ``grok.serve`` for a server).

Glossary: B sequences (rows), T prompt bucket length, S cache slots per row, V vocab,
P max_position_embeddings, L layers, K kv heads, H head dim.

The rules, each in one place here:

- Keys: the caller gives each sequence its PRNG key ``key_b`` (``sequence_keys``: the key of
  a seed, folded with a stream index where one seed serves several sequences). Its i-th new
  token (0-based) is drawn with ``fold_in(key_b, i)`` (``token_keys``), so a sequence's draws
  depend on its key and its own tokens only, never on the batch it runs in.
- Sampling: one hook, a ``TokenSampler``, called at prefill (the first token) and at every
  step. It is hashable and a static argument of the compiled programs: settings it fixes at
  trace time (``FixedSampler``, what ``generate`` uses) cost nothing at run time, and
  per-row settings and state (the server's ``grok.serve.sampler.RowSampler``) ride in the
  rows as data.
- Finishing: ``finish_reason`` (a stop, the token budget, the end of the context).
- Non-finite logits: every draw flags the rows whose logits hold a NaN or an infinity
  (``Drawn.nonfinite``); callers end those sequences with ``nonfinite_error`` instead of
  handing out what a sampler made of them.
- The cache: the core reaches it only through a ``CacheStore`` (see there): ``DenseCache``
  (every row its own slots) or ``PagedCache`` (a pool of pages, a page table per row), the
  same prefill, step and loop for both.

Rows (``Rows``) are the state of B sequences between steps. ``prefill`` makes rows from
prompts, ``insert`` puts them into rows of a running batch (the server), ``step`` gives every
row one token, and ``run`` loops ``step`` inside one ``lax.while_loop`` with a per-row stop
rule and a record of the tokens (``begin`` and ``DecodeState``: ``generate``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from grok.cache_store import CacheStore, DenseCache, PagedCache, set_rows
from grok.errors import GenerationError
from grok.kv_cache import KVCache
from grok.sampling import Sampler, greedy

# The smallest prompt / cache bucket: below this, padding costs less than a recompile would.
MIN_BUCKET = 16
# Seeds are fed to jax.random.key as uint32.
MAX_SEED = 2**32 - 1

FINISH_STOP = "stop"  # a stop token or a stop string
FINISH_LENGTH = "length"  # the token budget (max_new_tokens, max_tokens) is spent
FINISH_CONTEXT = "context"  # the last token sits at position P - 1: the context is full

# ``apply(params, tokens [B, T], positions [B, T], rope, cache, kv_lengths [B], logits_at [B])``
# -> (logits [B, T or 1, V] float32, cache): the Haiku apply of ``grok.model.forward_fns``.
ApplyFn = Callable[..., tuple[jax.Array, KVCache | None]]


def bucket_length(n: int, limit: int) -> int:
    """The bucket that holds ``n`` tokens: the smallest power of two >= max(n, MIN_BUCKET),
    capped at ``limit`` (P). ``n`` must be <= ``limit``."""
    if n > limit:
        raise GenerationError(f"{n} tokens do not fit in a context of {limit}")
    return min(limit, max(MIN_BUCKET, 1 << max(0, n - 1).bit_length()))


def finish_reason(
    *, stopped: bool, num_new: int, max_new: int, context_full: bool = False
) -> str | None:
    """Why a sequence ends after its ``num_new``-th new token, or None while it runs: a stop
    (token or string) first, then the budget of ``max_new`` tokens, then a full context."""
    if stopped:
        return FINISH_STOP
    if num_new >= max_new:
        return FINISH_LENGTH
    if context_full:
        return FINISH_CONTEXT
    return None


# -- keys ----------------------------------------------------------------------------------


def sequence_keys(seeds: jax.Array, streams: jax.Array | None = None) -> jax.Array:
    """Each sequence's key [B]: ``key(seeds[b])``, or ``fold_in(key(seeds[b]), streams[b])``
    where one seed serves several sequences (uint32 [B] each)."""
    if streams is None:
        return jax.vmap(jax.random.key)(seeds)
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, streams)


def token_keys(keys: jax.Array, counters: jax.Array) -> jax.Array:
    """The keys [B] that draw each row's ``counters[b]``-th new token: ``fold_in(keys[b],
    counters[b])``."""
    return jax.vmap(jax.random.fold_in)(keys, counters)


# -- non-finite logits ----------------------------------------------------------------------


def nonfinite_rows(logits: jax.Array) -> jax.Array:
    """bool [B]: rows of ``logits`` [B, V] that hold a NaN or an infinity."""
    return ~jnp.all(jnp.isfinite(logits), axis=-1)


def nonfinite_error(sequence: int, token: int, affected: str = "") -> GenerationError:
    """The error for a sequence whose ``token``-th new token came from non-finite logits
    (``affected``: e.g. " (2 of 8 sequences affected)")."""
    return GenerationError(
        f"the model produced non-finite logits (NaN or inf) for sequence {sequence} at its new "
        f"token {token}{affected}: the weights or their dtype are broken (check the "
        "checkpoint, its scales and --dtype)"
    )


def check_finite(nonfinite: np.ndarray, num_new: np.ndarray) -> None:
    """GenerationError when some row's logits held a NaN or an infinity (host flags [B] and
    token counts [B]), so a broken model never yields tokens silently."""
    rows = np.flatnonzero(nonfinite)
    if rows.size:
        b = int(rows[0])
        raise nonfinite_error(
            b, int(num_new[b]), f" ({rows.size} of {nonfinite.size} sequences affected)"
        )


# -- sampling --------------------------------------------------------------------------------


class TokenSampler(Protocol):
    """The sampling hook of ``prefill`` and ``step``: hashable (a static argument of the
    compiled programs), called inside them."""

    def __call__(
        self, logits: jax.Array, keys: jax.Array, counters: jax.Array, data: Any, active: jax.Array
    ) -> tuple[jax.Array, Any, Any]:
        """One token per row.

        Args:
          logits: f32 [B, V].
          keys: [B] PRNG keys, the sequences' own; row b draws with
            ``token_keys(keys, counters)[b]`` only.
          counters: i32 [B], the index of the token being drawn in its sequence.
          data: the rows' per-row sampler data (``Rows.data``: a pytree of [B, ...] arrays),
            or None.
          active: bool [B], the rows whose token counts (the others ride along).
        Returns:
          (tokens i32 [B], a report for the caller or None, the rows' data after the draw).
        """
        ...


@dataclasses.dataclass(frozen=True)
class FixedSampler:
    """A ``grok.sampling.Sampler`` as the core's hook: one setting for every row, fixed at
    trace time; no per-row data, no report."""

    sampler: Sampler

    def __call__(
        self, logits: jax.Array, keys: jax.Array, counters: jax.Array, data: Any, active: jax.Array
    ) -> tuple[jax.Array, None, Any]:
        if self.sampler.is_greedy:
            return greedy(logits), None, data  # no key is used
        step_keys = token_keys(keys, counters)  # [B]
        sample = self.sampler.sample
        tokens = jax.vmap(lambda row, key: sample(row[None], key)[0])(logits, step_keys)
        return tokens, None, data


# -- rows, prefill and the step ---------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rows:
    """The state of B sequences between steps (a pytree, donated to each compiled step).

    Attributes:
      cache: the KV cache in its carried form (``CacheStore.carry``), k/v [L, B, S, K, H].
      token: i32 [B], each row's last sampled token (the next step's input).
      position: i32 [B], that token's position (not yet in the cache).
      num_new: i32 [B], tokens sampled so far (the counter of the key rule).
      keys: u32 [B, 2]-like raw data of each row's key (``jax.random.key_data``).
      data: the sampler's per-row data (see ``TokenSampler``), or None.
    """

    cache: Any
    token: jax.Array
    position: jax.Array
    num_new: jax.Array
    keys: jax.Array
    data: Any = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Drawn:
    """What one draw gives per row.

    Attributes:
      token: i32 [B], the drawn tokens (of every row; an inactive row's is not kept).
      logits: f32 [B, V] they were drawn from (None once a caller drops them).
      nonfinite: bool [B], rows whose logits held a NaN or an infinity.
      report: the sampler's report (see ``TokenSampler``), or None.
    """

    token: jax.Array
    logits: jax.Array | None
    nonfinite: jax.Array
    report: Any = None


def prefill(
    params: Any,
    rope: Any,
    cache: KVCache,
    tokens: jax.Array,
    lengths: jax.Array,
    keys: jax.Array,
    data: Any,
    active: jax.Array,
    *,
    apply_fn: ApplyFn,
    sampler: TokenSampler,
    store: CacheStore,
    every_position: bool = False,
    start: jax.Array | None = None,
    num_new: jax.Array | None = None,
) -> tuple[Rows, Drawn, jax.Array]:
    """Runs prompts (or the next piece of each) into a cache and draws each row's next token.

    Args:
      params, rope: the model's parameters and rotary table.
      cache: the rows' cache: an empty one (``store.empty(B, >= T)``), or with ``start``
        one that holds each row's positions < start[b] already (a paged cache's shared
        prefix pages, or the earlier pieces of a prompt prefilled in chunks).
      tokens: i32 [B, T], right-padded prompts (row b's token i at position start[b] + i;
        the padding is written too, but attention only sees positions < start[b] +
        lengths[b], and each decode step overwrites the next position before it becomes
        visible).
      lengths: i32 [B], the tokens of each row in ``tokens`` (>= 1).
      keys: the rows' raw key data (``Rows.keys``).
      data: the rows' sampler data (``Rows.data``).
      active: bool [B], rows whose drawn token counts (the others keep token 0 and their
        count: a piece of a prompt that is not its last).
      every_position: the logits of every prompt position, not only the last.
      start: i32 [B], each row's first position (default 0).
      num_new: i32 [B], tokens each row has drawn before (default 0): the draw is its token
        ``num_new[b]`` (a sequence recomputed after it was preempted goes on where it was).
    Returns:
      (the rows, their cache carried, each at its prompt's end, the draw, the logits
      [B, T, V] with ``every_position``, else [B, 1, V]).
    """
    b, t = tokens.shape
    zeros = jnp.zeros((b,), jnp.int32)
    start = zeros if start is None else start
    counters = zeros if num_new is None else num_new
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    ends = start + lengths  # [B], valid positions after the prompt
    # Without every_position only each row's last prompt position needs the head: [B, 1, V].
    logits_at = None if every_position else lengths - 1
    logits, cache = apply_fn(params, tokens, positions, rope, cache, ends, logits_at)
    if every_position:
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, V]
    else:
        last = logits[:, 0]  # [B, V]
    token, report, data = sampler(last, jax.random.wrap_key_data(keys), counters, data, active)
    rows = Rows(
        cache=store.carry(cache),
        token=jnp.where(active, token, zeros),
        position=ends,
        num_new=counters + active.astype(jnp.int32),
        keys=keys,
        data=data,
    )
    return rows, Drawn(token, last, nonfinite_rows(last), report), logits


def insert(rows: Rows, new: Rows, slots: jax.Array, store: CacheStore) -> Rows:
    """``new`` (n rows from ``prefill``) into rows ``slots`` [n] of a running batch ``rows``;
    slots >= B (padding rows) are dropped."""
    cache = store.insert(rows.cache, new.cache, slots)
    old, fresh = (dataclasses.replace(r, cache=None) for r in (rows, new))
    merged = jax.tree_util.tree_map(lambda a, x: set_rows(a, slots, x), old, fresh)
    return dataclasses.replace(merged, cache=cache)


def step(
    params: Any,
    rope: Any,
    rows: Rows,
    active: jax.Array,
    *,
    apply_fn: ApplyFn,
    sampler: TokenSampler,
    store: CacheStore,
) -> tuple[Rows, Drawn]:
    """One token for every row: each row's last token goes into the cache at its position and
    the next one is drawn. Only ``active`` [B] rows advance; the others ride along (their
    cache slot at ``position`` is rewritten with the same token, their outputs are frozen)."""
    logits, cache = apply_fn(
        params,
        rows.token[:, None],
        rows.position[:, None],
        rope,
        store.uncarry(rows.cache),
        rows.position + 1,
    )  # [B, 1, V]
    logits = logits[:, 0]  # [B, V]
    keys = jax.random.wrap_key_data(rows.keys)
    token, report, data = sampler(logits, keys, rows.num_new, rows.data, active)
    moved = active.astype(jnp.int32)  # [B]
    rows = Rows(
        cache=store.carry(cache),
        token=jnp.where(active, token, rows.token),
        position=rows.position + moved,  # the new token's position
        num_new=rows.num_new + moved,
        keys=rows.keys,
        data=data,
    )
    return rows, Drawn(token, logits, nonfinite_rows(logits), report)


# -- the decode loop ------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """What the decode loop carries (a pytree; donated to each decode call).

    Attributes:
      rows: the sequences (``Rows``; their ``position`` is that of ``token``).
      done: [B] bool, rows that have stopped.
      out: [B, S] int32, the sampled tokens (row b's first ``rows.num_new[b]`` are valid).
      logits: [B, S, V] float32 logits of each sampled token, or None when not recorded.
      step: [] int32, decode steps run so far.
      nonfinite: [B] bool, rows whose logits held a NaN or an infinity (such a row stops;
        the caller then raises ``check_finite``'s error instead of returning its tokens).
    """

    rows: Rows
    done: jax.Array
    out: jax.Array
    logits: jax.Array | None
    step: jax.Array
    nonfinite: jax.Array


def record(
    state: DecodeState,
    drawn: Drawn,
    active: jax.Array,
    stop_mask: jax.Array,
    max_new: jax.Array,
    context: int,
) -> DecodeState:
    """Notes the tokens ``drawn`` for the ``active`` [B] rows (``state.rows`` already counts
    them) and decides which rows are done now: a stop token (``stop_mask`` [V]), ``max_new``
    tokens, a token at position P - 1 (``context`` P), non-finite logits."""
    rows = state.rows
    nonfinite = state.nonfinite | (active & drawn.nonfinite)  # [B]
    index = jnp.arange(drawn.token.shape[0])
    slot = jnp.where(active, rows.num_new - 1, state.out.shape[1])  # out of range: dropped
    out = state.out.at[index, slot].set(drawn.token, mode="drop")
    recorded = state.logits
    if recorded is not None:
        recorded = recorded.at[index, slot].set(drawn.logits.astype(jnp.float32), mode="drop")
    done = (
        state.done
        | stop_mask[drawn.token]
        | (rows.num_new >= max_new)
        | (rows.position >= context - 1)  # the new token takes the last position of the context
        | nonfinite
    )
    return dataclasses.replace(state, done=done, out=out, logits=recorded, nonfinite=nonfinite)


def begin(
    params: Any,
    rope: Any,
    tokens: jax.Array,
    lengths: jax.Array,
    keys: jax.Array,
    max_new: jax.Array,
    stop_mask: jax.Array,
    *,
    cache_len: int,
    record_logits: bool,
    apply_fn: ApplyFn,
    sampler: TokenSampler,
    store: CacheStore,
) -> DecodeState:
    """The loop's state after ``prefill`` of prompts [B, T] into an empty cache of
    ``cache_len`` slots per row, with each row's first new token recorded (``record``).

    Rows whose prompt fills the context, and every row when ``max_new`` is 0, are done from
    the start (nothing to sample). ``record_logits``: keep the logits of every token.
    """
    context = store.config.max_position_embeddings
    b = tokens.shape[0]
    done = (lengths >= context) | (max_new <= 0)  # [B]
    hooks = {"apply_fn": apply_fn, "sampler": sampler, "store": store}
    cache = store.empty(b, cache_len)
    rows, drawn, _ = prefill(params, rope, cache, tokens, lengths, keys, None, ~done, **hooks)
    # A row that fills the cache is done: its position only has to stay a valid slot.
    rows = dataclasses.replace(rows, position=jnp.minimum(rows.position, cache_len - 1))
    recorded = None
    if record_logits:
        recorded = jnp.zeros((b, cache_len, drawn.logits.shape[-1]), jnp.float32)  # [B, S, V]
    state = DecodeState(
        rows=rows,
        done=done,
        out=jnp.zeros((b, cache_len), jnp.int32),
        logits=recorded,
        step=jnp.zeros((), jnp.int32),
        nonfinite=jnp.zeros((b,), jnp.bool_),
    )
    return record(state, drawn, ~done, stop_mask, max_new, context)


def run(
    params: Any,
    rope: Any,
    state: DecodeState,
    limit: jax.Array,
    max_new: jax.Array,
    stop_mask: jax.Array,
    *,
    apply_fn: ApplyFn,
    sampler: TokenSampler,
    store: CacheStore,
) -> DecodeState:
    """Steps inside one ``lax.while_loop`` until every row is done or ``state.step`` reaches
    ``limit`` (see ``record`` for when a row is done)."""
    context = store.config.max_position_embeddings

    def cond(s: DecodeState) -> jax.Array:
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        active = ~s.done
        rows, drawn = step(
            params, rope, s.rows, active, apply_fn=apply_fn, sampler=sampler, store=store
        )
        s = dataclasses.replace(s, rows=rows, step=s.step + 1)
        return record(s, drawn, active, stop_mask, max_new, context)

    return jax.lax.while_loop(cond, body, state)


def pin(
    state: DecodeState,
    cache_sharding: jax.sharding.Sharding | None,
    host_sharding: jax.sharding.Sharding | None,
) -> DecodeState:
    """Pins the loop state's layout on a mesh: k/v to ``cache_sharding``, everything else
    (what the host reads, and the keys) to ``host_sharding``, replicated over the mesh so
    that every process holds it whole. Prefill's output and decode's input and output then
    share one layout, so decode compiles once. None: left to the compiler."""

    def constrain(x: jax.Array, sharding: jax.sharding.Sharding | None) -> jax.Array:
        return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

    cache = state.rows.cache
    cache = dataclasses.replace(
        cache,
        k=constrain(cache.k, cache_sharding),
        v=constrain(cache.v, cache_sharding),
        lengths=constrain(cache.lengths, host_sharding),
    )
    rest = dataclasses.replace(state, rows=dataclasses.replace(state.rows, cache=None))
    rest = jax.tree_util.tree_map(lambda x: constrain(x, host_sharding), rest)
    return dataclasses.replace(rest, rows=dataclasses.replace(rest.rows, cache=cache))


__all__ = [
    "FINISH_CONTEXT",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "MAX_SEED",
    "MIN_BUCKET",
    "ApplyFn",
    "CacheStore",
    "DecodeState",
    "DenseCache",
    "Drawn",
    "FixedSampler",
    "PagedCache",
    "Rows",
    "TokenSampler",
    "begin",
    "bucket_length",
    "check_finite",
    "finish_reason",
    "insert",
    "nonfinite_error",
    "nonfinite_rows",
    "pin",
    "prefill",
    "record",
    "run",
    "sequence_keys",
    "step",
    "token_keys",
]
