"""The server's batch on the device: B slots' rows (``grok.decode.Rows``) and the compiled
prefill and step the engine runs on them.

Glossary: B slots (``max_batch``), S cache length per slot (``max_context``), n sequences
prefilled together, T their prompt bucket, V vocab, R reported top logprobs.

The rows' sampler data is ``grok.serve.sampler.RowData`` (each slot's settings and penalty
counts) and every draw goes through ``RowSampler``; the cache is reached through the rows'
store (``grok.decode.DenseCache``), held in its carried form between steps.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from grok import decode
from grok.api import Model
from grok.decode import DenseCache, Drawn, Rows
from grok.serve.sampler import TOP_LOGPROBS, RowData, RowSampler, RowSettings
from grok.sharding import kv_cache_sharding

# The sampling hook of every compiled prefill and step (stateless: its data rides in the rows).
_SAMPLER = RowSampler()


def initial_state(model: Model, store: DenseCache, batch: int, context: int) -> Rows:
    """Empty rows for ``batch`` slots of ``context`` tokens, committed where every step's
    outputs will live (so each shape compiles once): on a mesh, replicated over it, k/v laid
    out like the model's K heads."""
    # Held in the carried form between steps (DenseCache.carry): never copied whole.
    cache = store.carry(store.empty(batch, context))

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
    kv = kv_cache_sharding(mesh, model.config, batch)
    cache = dataclasses.replace(
        state.cache, k=jax.device_put(state.cache.k, kv), v=jax.device_put(state.cache.v, kv)
    )
    return dataclasses.replace(state, cache=cache)


@functools.partial(
    jax.jit, static_argnames=("apply_fn", "store", "prompt_logprobs"), donate_argnames=("state",)
)
def prefill(
    params: Any,
    rope: Any,
    state: Rows,
    tokens: jax.Array,
    lengths: jax.Array,
    slots: jax.Array,
    settings: RowSettings,
    seeds: jax.Array,
    choices: jax.Array,
    *,
    apply_fn: Callable,
    store: DenseCache,
    prompt_logprobs: bool,
) -> tuple[Rows, Drawn, tuple[jax.Array, jax.Array, jax.Array] | None]:
    """Prefills n prompts tokens [n, T] (row i valid up to lengths[i]) into slots [n] of the
    slots' rows ``state`` (slots >= B: padding rows, dropped), with ``settings`` [n] and keys
    ``fold_in(key(seeds[i]), choices[i])``.

    Returns the new state, the first token's draw [n] (its report a ``Draw``; logits
    dropped), and with ``prompt_logprobs`` the prompt tokens' logprobs (``_prompt_logprobs``).
    """
    n, t = tokens.shape
    keys = jax.random.key_data(decode.sequence_keys(seeds, choices))  # [n, 2]
    data = RowData.fresh(settings, state.data.counts.shape[-1])
    active = jnp.ones((n,), jnp.bool_)
    hooks = {"apply_fn": apply_fn, "sampler": _SAMPLER, "store": store}
    rows, drawn, logits = decode.prefill(
        params,
        rope,
        store.empty(n, t),
        tokens,
        lengths,
        keys,
        data,
        active,
        every_position=prompt_logprobs,
        **hooks,
    )
    prompt = _prompt_logprobs(logits, tokens) if prompt_logprobs else None
    state = decode.insert(state, rows, slots, store)
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
    *,
    apply_fn: Callable,
    store: DenseCache,
) -> tuple[Rows, Drawn]:
    """One token for every slot (``grok.decode.step``); only ``active`` [B] slots advance."""
    hooks = {"apply_fn": apply_fn, "sampler": _SAMPLER, "store": store}
    state, drawn = decode.step(params, rope, state, active, **hooks)
    return state, dataclasses.replace(drawn, logits=None)


__all__ = ["decode_step", "initial_state", "prefill"]
