"""The server's batch on the device: B slots' rows (``grok.decode.Rows``) over one paged KV
pool, the compiled prefill and step the engine runs on them, and their inputs from a plan of
the scheduler's (``grok.serve.scheduler``).

Glossary: B slots (``max_batch``), M pages of Z tokens in the pool, W page-table width of a
call, n rows prefilled together, T their bucket length, V vocab, R reported top logprobs.

The rows' sampler data is ``grok.serve.sampler.RowData`` (each slot's settings and penalty
counts) and every draw goes through ``RowSampler``; the cache is reached through the rows'
store (``grok.decode.PagedCache``), the pool held in its carried form between calls. The
page tables are the host's (the scheduler's): each call takes the tables of its rows and
attaches them to the pool for that call only, so a row that is not in a call has no page to
write to.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grok import decode
from grok.api import Model
from grok.decode import Drawn, PagedCache, Rows, bucket_length
from grok.serve.sampler import TOP_LOGPROBS, RowData, RowSampler, RowSettings
from grok.serve.scheduler import Run, Scheduler
from grok.sharding import kv_cache_sharding

# The sampling hook of every compiled prefill and step (stateless: its data rides in the rows).
_SAMPLER = RowSampler()


def initial_state(model: Model, store: PagedCache, batch: int, num_pages: int) -> Rows:
    """Empty rows for ``batch`` slots over an empty pool of ``num_pages`` pages, committed
    where every call's outputs will live (so each shape compiles once): on a mesh, replicated
    over it, the pool's K heads split like the model's (its pages are not split: any row may
    hold any page)."""
    cache = store.carry(store.pool(num_pages))  # the carried form between calls, never copied

    def zeros() -> jax.Array:  # a new buffer each: the state is donated, field by field
        return jnp.zeros((batch,), jnp.int32)

    key_data = jax.random.key_data(jax.vmap(jax.random.key)(jnp.zeros((batch,), jnp.uint32)))
    state = Rows(
        cache=cache,
        token=zeros(),
        position=zeros(),
        num_new=zeros(),
        keys=key_data,
        data=RowData.fresh(RowSettings.zeros(batch), model.config.vocab_size),
    )
    mesh = model.mesh
    if mesh is None:
        return jax.device_put(state, jax.devices()[0])
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    kv = kv_cache_sharding(mesh, model.config, 1)  # one row: the data axis splits nothing
    cache = dataclasses.replace(
        state.cache, k=jax.device_put(state.cache.k, kv), v=jax.device_put(state.cache.v, kv)
    )
    return dataclasses.replace(state, cache=cache)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefillInputs:
    """One prefill call's rows (``prefill_inputs``): each the next piece of an admitted
    sequence's tokens.

    Attributes:
      tokens: i32 [n, T], the pieces, right-padded.
      lengths: i32 [n], tokens in each piece (padding rows: 1).
      start: i32 [n], the position of each piece's first token.
      pages: i32 [n, W], the rows' page tables (M: no page).
      slots: i32 [n], each row's slot (B: a padding row, dropped).
      settings: the rows' ``RowSettings``.
      seeds, choices: u32 [n], each sequence's key ``fold_in(key(seed), choice)``.
      num_new: i32 [n], tokens the sequence drew before (after a preemption): the index of
        the token its last piece draws.
      prompt_len: i32 [n], positions below it are the prompt's, the rest were drawn (they
        count for the penalties).
      first: bool [n], the sequence's first piece since its admission (its slot's penalty
        counts start from nothing).
      last: bool [n], the sequence's last piece (its draw counts).
    """

    tokens: jax.Array
    lengths: jax.Array
    start: jax.Array
    pages: jax.Array
    slots: jax.Array
    settings: RowSettings
    seeds: jax.Array
    choices: jax.Array
    num_new: jax.Array
    prompt_len: jax.Array
    first: jax.Array
    last: jax.Array


def prefill_inputs(
    plan: Sequence[tuple[Run, int]],
    scheduler: Scheduler,
    *,
    batch: int,
    width: int,
    settings: Callable[[Any], dict[str, float]],
    key: Callable[[Any], tuple[int, int]],
) -> PrefillInputs:
    """The inputs of the call that prefills ``plan``'s (run, tokens) pieces: n rows (a power of
    two, so that few shapes compile; padding rows go to slot ``batch``, dropped) of T tokens
    (the pieces' bucket), page tables ``width`` wide. ``settings(seq)``: a sequence's
    ``RowSettings`` fields; ``key(seq)``: its (seed, choice)."""
    n = 1 << max(0, len(plan) - 1).bit_length()
    longest = max(count for _, count in plan)
    t = min(bucket_length(longest, scheduler.context), scheduler.context)
    tokens = np.zeros((n, t), np.int32)
    ints = {name: np.zeros((n,), np.int32) for name in ("start", "num_new", "prompt_len")}
    lengths = np.ones((n,), np.int32)
    slots = np.full((n,), batch, np.int32)
    seeds, choices = np.zeros((n,), np.uint32), np.zeros((n,), np.uint32)
    first, last = np.zeros((n,), np.bool_), np.zeros((n,), np.bool_)
    rows: dict[str, list[float]] = {f.name: [0.0] * n for f in dataclasses.fields(RowSettings)}
    for i, (run, count) in enumerate(plan):
        tokens[i, :count] = run.tokens[run.cached : run.cached + count]
        lengths[i], slots[i] = count, run.slot
        ints["start"][i], ints["num_new"][i] = run.cached, run.drawn
        ints["prompt_len"][i] = run.prompt_len
        seeds[i], choices[i] = key(run.seq)
        first[i], last[i] = not run.started, run.cached + count >= len(run.tokens)
        for name, value in settings(run.seq).items():
            rows[name][i] = value
    runs = [run for run, _ in plan] + [None] * (n - len(plan))  # padding rows: no page
    row_settings = RowSettings(
        **{
            name: jnp.asarray(values, jnp.int32 if name == "top_k" else jnp.float32)
            for name, values in rows.items()
        }
    )
    return PrefillInputs(
        tokens=jnp.asarray(tokens),
        lengths=jnp.asarray(lengths),
        start=jnp.asarray(ints["start"]),
        pages=jnp.asarray(scheduler.table(runs, width)),
        slots=jnp.asarray(slots),
        settings=row_settings,
        seeds=jnp.asarray(seeds),
        choices=jnp.asarray(choices),
        num_new=jnp.asarray(ints["num_new"]),
        prompt_len=jnp.asarray(ints["prompt_len"]),
        first=jnp.asarray(first),
        last=jnp.asarray(last),
    )


def _drawn_counts(x: PrefillInputs, vocab: int) -> jax.Array:
    """i32 [n, V]: how often each id occurs among the pieces' drawn tokens (positions at or
    past ``prompt_len``)."""
    n, t = x.tokens.shape
    index = jnp.arange(t, dtype=jnp.int32)[None, :]  # [1, T]
    drawn = (index < x.lengths[:, None]) & (x.start[:, None] + index >= x.prompt_len[:, None])
    rows = jnp.broadcast_to(jnp.arange(n)[:, None], (n, t))
    return jnp.zeros((n, vocab), jnp.int32).at[rows, x.tokens].add(drawn.astype(jnp.int32))


@functools.partial(
    jax.jit, static_argnames=("apply_fn", "store", "prompt_logprobs"), donate_argnames=("state",)
)
def prefill(
    params: Any,
    rope: Any,
    state: Rows,
    x: PrefillInputs,
    *,
    apply_fn: Callable,
    store: PagedCache,
    prompt_logprobs: bool,
) -> tuple[Rows, Drawn, tuple[jax.Array, jax.Array, jax.Array] | None]:
    """Prefills the pieces ``x`` into the pool through their page tables and into their slots'
    rows; a sequence's last piece draws its next token (keys ``fold_in(key(seed), choice)``,
    its index ``x.num_new``), with the penalty counts of the tokens it drew before.

    Returns the new state, the draw [n] (its report a ``Draw``; logits dropped), and with
    ``prompt_logprobs`` the prompt tokens' logprobs (``_prompt_logprobs``; one piece per row
    from position 0).
    """
    keys = jax.random.key_data(decode.sequence_keys(x.seeds, x.choices))  # [n, 2]
    before = state.data.counts[jnp.minimum(x.slots, state.token.shape[0] - 1)]  # [n, V]
    counts = _drawn_counts(x, before.shape[-1]) + jnp.where(x.first[:, None], 0, before)
    cache = dataclasses.replace(store.uncarry(state.cache), pages=x.pages, lengths=None)
    rows, drawn, logits = decode.prefill(
        params,
        rope,
        cache,
        x.tokens,
        x.lengths,
        keys,
        RowData(x.settings, counts),
        x.last,
        apply_fn=apply_fn,
        sampler=_SAMPLER,
        store=store,
        every_position=prompt_logprobs,
        start=x.start,
        num_new=x.num_new,
    )
    prompt = _prompt_logprobs(logits, x.tokens) if prompt_logprobs else None
    state = decode.insert(state, rows, x.slots, store)
    return state, dataclasses.replace(drawn, logits=None), prompt


def _prompt_logprobs(
    logits: jax.Array, tokens: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The prompt tokens' logprobs [n, T] from every position's logits [n, T, V] (entry t:
    token t given tokens < t; entry 0 is unused) with the alternatives at each position (ids
    and logprobs [n, T, R])."""
    lp = jax.nn.log_softmax(logits, axis=-1)
    given = jnp.take_along_axis(lp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]  # [n, T-1]
    given = jnp.pad(given, ((0, 0), (1, 0)))  # [n, T]; entry t is token t's logprob
    top_lp, top_ids = jax.lax.top_k(lp, TOP_LOGPROBS)  # [n, T, R], predicting t + 1
    top_lp = jnp.pad(top_lp[:, :-1], ((0, 0), (1, 0), (0, 0)))  # shifted to token t
    top_ids = jnp.pad(top_ids[:, :-1], ((0, 0), (1, 0), (0, 0)))
    return given, top_ids.astype(jnp.int32), top_lp


@functools.partial(jax.jit, static_argnames=("apply_fn", "store"), donate_argnames=("state",))
def decode_step(
    params: Any,
    rope: Any,
    state: Rows,
    active: jax.Array,
    pages: jax.Array,
    *,
    apply_fn: Callable,
    store: PagedCache,
) -> tuple[Rows, Drawn]:
    """One token for every slot (``grok.decode.step``) through the slots' page tables
    ``pages`` [B, W]; only ``active`` [B] slots advance (the others have no page: their rows
    write nothing)."""
    hooks = {"apply_fn": apply_fn, "sampler": _SAMPLER, "store": store}
    rows = dataclasses.replace(state, cache=dataclasses.replace(state.cache, pages=pages))
    rows, drawn = decode.step(params, rope, rows, active, **hooks)
    pool = dataclasses.replace(rows.cache, pages=None, lengths=None)
    return dataclasses.replace(rows, cache=pool), dataclasses.replace(drawn, logits=None)


__all__ = ["PrefillInputs", "decode_step", "initial_state", "prefill", "prefill_inputs"]
