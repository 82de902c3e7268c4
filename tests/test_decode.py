"""The decode core (``grok.decode``): its rules, the cache store, prefill, insert and the step.

``generate`` and ``grok-serve`` end to end are tests/test_generate.py and tests/serve/test_serve.py;
here each piece of the core is checked on its own, on a float32 TINY_GROK2 with random weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params

from grok import decode
from grok.api import Model
from grok.decode import DenseCache, FixedSampler, Rows
from grok.errors import GenerationError
from grok.kv_cache import KVCache
from grok.presets import TINY_GROK2
from grok.sampling import Sampler
from grok.serve.sampler import RowData, RowSampler, RowSettings

CONFIG = TINY_GROK2


@pytest.fixture(scope="module")
def model():
    return Model(CONFIG, random_params(CONFIG, 0), dtype=jnp.float32)


def test_finish_reason_order():
    reason = decode.finish_reason
    assert reason(stopped=True, num_new=8, max_new=8, context_full=True) == decode.FINISH_STOP
    assert reason(stopped=False, num_new=8, max_new=8, context_full=True) == decode.FINISH_LENGTH
    assert reason(stopped=False, num_new=3, max_new=8, context_full=True) == decode.FINISH_CONTEXT
    assert reason(stopped=False, num_new=3, max_new=8) is None


def test_sequence_keys_are_the_callers_formulas():
    """generate's ``fold_in(key(seed), b)`` / ``key(seed[b])`` and the server's
    ``fold_in(key(seed), choice)`` are both ``sequence_keys``; token i uses ``fold_in(key, i)``."""

    def data(keys):
        return np.asarray(jax.random.key_data(keys))

    seeds = jnp.array([7, 7, 9], jnp.uint32)
    streams = jnp.array([0, 1, 4], jnp.uint32)
    folded = decode.sequence_keys(seeds, streams)
    for b in range(3):
        want = jax.random.fold_in(jax.random.key(int(seeds[b])), int(streams[b]))
        np.testing.assert_array_equal(data(folded[b]), data(want))
        np.testing.assert_array_equal(
            data(decode.sequence_keys(seeds)[b]), data(jax.random.key(int(seeds[b])))
        )
    counters = jnp.array([0, 3, 5], jnp.int32)
    step = decode.token_keys(folded, counters)
    for b in range(3):
        want = jax.random.fold_in(folded[b], int(counters[b]))
        np.testing.assert_array_equal(data(step[b]), data(want))


def test_both_sampling_hooks_follow_the_key_rule():
    """Unfiltered at temperature 1, generate's hook and the server's draw the same tokens from
    the same keys and counters; greedy, both take the first maximum."""
    v = 64
    logits = jax.random.normal(jax.random.key(0), (4, v)) * 2  # [B, V]
    keys = decode.sequence_keys(jnp.arange(4, dtype=jnp.uint32))
    active = jnp.ones((4,), jnp.bool_)
    greedy_rows = RowSettings.zeros(4)
    random_rows = RowSettings(jnp.ones((4,)), *jax.tree.leaves(greedy_rows)[1:])
    for c in range(4):
        counters = jnp.full((4,), c, jnp.int32)
        for sampler, settings in (
            (Sampler(temperature=1.0), random_rows),
            (Sampler(), greedy_rows),
        ):
            fixed, _, _ = FixedSampler(sampler)(logits, keys, counters, None, active)
            data = RowData.fresh(settings, v)
            rows, draw, after = RowSampler()(logits, keys, counters, data, active)
            np.testing.assert_array_equal(np.asarray(fixed), np.asarray(rows))
            np.testing.assert_array_equal(np.asarray(draw.token), np.asarray(rows))
            # The server's hook counts each drawn token for the penalties.
            assert np.asarray(after.counts).sum() == 4
            assert np.all(np.asarray(after.counts)[np.arange(4), np.asarray(rows)] == 1)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dense_cache_carry_round_trip(dtype):
    store = DenseCache(CONFIG, jnp.dtype(dtype))
    cache = store.empty(2, 16)
    cache = KVCache(k=cache.k + 1.5, v=cache.v - 2.0, lengths=cache.lengths + 3)
    carried = store.carry(cache)
    assert carried.k.nbytes == cache.k.nbytes  # a view of the same bits, never widened
    back = store.uncarry(carried)
    assert back.k.dtype == jnp.dtype(dtype) and back.k.shape == cache.k.shape
    np.testing.assert_array_equal(np.asarray(back.k, np.float32), np.asarray(cache.k, np.float32))
    np.testing.assert_array_equal(np.asarray(back.v, np.float32), np.asarray(cache.v, np.float32))


def test_nonfinite_flags_and_error():
    logits = jnp.array([[0.0, 1.0], [jnp.nan, 1.0], [0.0, jnp.inf]])
    np.testing.assert_array_equal(np.asarray(decode.nonfinite_rows(logits)), [False, True, True])
    with pytest.raises(GenerationError, match=r"sequence 1 at its new token 4 \(2 of 3"):
        decode.check_finite(np.array([False, True, True]), np.array([1, 4, 2]))
    decode.check_finite(np.zeros(3, bool), np.ones(3, np.int32))  # nothing to report


def _prefilled(model, prompts, store):
    """Rows of ``prompts`` prefilled (greedy) into a fresh 32-slot cache, and their draw."""
    b = len(prompts)
    tokens = np.zeros((b, 16), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    keys = jax.random.key_data(decode.sequence_keys(jnp.arange(b, dtype=jnp.uint32)))
    rows, drawn, _ = decode.prefill(
        model.params,
        model.rope,
        store.empty(b, 32),
        jnp.asarray(tokens),
        lengths,
        keys,
        None,
        jnp.ones((b,), jnp.bool_),
        apply_fn=model.apply_fn,
        sampler=FixedSampler(Sampler()),
        store=store,
    )
    return rows, drawn


def test_prefill_and_step_follow_the_full_forward(model):
    """Greedy prefill then steps give the full forward's argmax; an inactive row is frozen."""
    prompts = [[5, 17, 200], [9, 8, 7, 6, 5]]
    store = DenseCache(CONFIG, jnp.dtype(jnp.float32))
    rows, drawn = _prefilled(model, prompts, store)
    np.testing.assert_array_equal(np.asarray(rows.position), [3, 5])
    np.testing.assert_array_equal(np.asarray(rows.num_new), [1, 1])
    seqs = [p + [int(t)] for p, t in zip(prompts, np.asarray(drawn.token), strict=True)]
    step = jax.jit(decode.step, static_argnames=("apply_fn", "sampler", "store"))
    hooks = {"apply_fn": model.apply_fn, "sampler": FixedSampler(Sampler()), "store": store}
    for _ in range(3):
        rows, drawn = step(model.params, model.rope, rows, jnp.array([True, True]), **hooks)
        assert not np.asarray(drawn.nonfinite).any()
        for seq, t in zip(seqs, np.asarray(drawn.token), strict=True):
            seq.append(int(t))
    for seq, prompt in zip(seqs, prompts, strict=True):
        full = np.asarray(model.logits(np.array([seq])))[0]  # [T, V]
        np.testing.assert_array_equal(np.argmax(full[len(prompt) - 1 : -1], -1), seq[len(prompt) :])
    frozen, _ = step(model.params, model.rope, rows, jnp.array([True, False]), **hooks)
    for field in ("token", "position", "num_new"):
        got, before = np.asarray(getattr(frozen, field)), np.asarray(getattr(rows, field))
        assert got[1] == before[1]
    assert np.asarray(frozen.position)[0] == np.asarray(rows.position)[0] + 1


def test_insert_puts_rows_into_slots_and_drops_padding(model):
    """New rows land in their slots (cache rows up to their T slots, every field, the
    sampler's data); a padding row (slot >= B) is dropped; other slots are untouched."""
    store = DenseCache(CONFIG, jnp.dtype(jnp.float32))
    b, s, v = 4, 32, CONFIG.vocab_size
    settings = RowSettings.zeros(b)
    running = Rows(
        cache=store.carry(store.empty(b, s)),
        token=jnp.full((b,), 9, jnp.int32),
        position=jnp.full((b,), 2, jnp.int32),
        num_new=jnp.full((b,), 7, jnp.int32),
        keys=jax.random.key_data(decode.sequence_keys(jnp.zeros((b,), jnp.uint32))),
        data=RowData.fresh(settings, v),
    )
    new_settings = RowSettings(jnp.full((2,), 0.5), *jax.tree.leaves(RowSettings.zeros(2))[1:])
    tokens = jnp.asarray([[1, 2, 3] + [0] * 13, [4, 5] + [0] * 14], jnp.int32)
    keys = jax.random.key_data(decode.sequence_keys(jnp.array([3, 4], jnp.uint32)))
    new, drawn, _ = decode.prefill(
        model.params,
        model.rope,
        store.empty(2, 16),
        tokens,
        jnp.array([3, 2], jnp.int32),
        keys,
        RowData.fresh(new_settings, v),
        jnp.ones((2,), jnp.bool_),
        apply_fn=model.apply_fn,
        sampler=RowSampler(),
        store=store,
    )
    merged = decode.insert(running, new, jnp.array([2, b], jnp.int32), store)
    np.testing.assert_array_equal(np.asarray(merged.position), [2, 2, 3, 2])
    np.testing.assert_array_equal(np.asarray(merged.num_new), [7, 7, 1, 7])
    np.testing.assert_array_equal(
        np.asarray(merged.token), [9, 9, int(np.asarray(drawn.token)[0]), 9]
    )
    np.testing.assert_array_equal(np.asarray(merged.keys)[2], np.asarray(keys)[0])
    np.testing.assert_array_equal(np.asarray(merged.data.settings.temperature), [0, 0, 0.5, 0])
    assert (
        np.asarray(merged.data.counts)[2].sum() == 1 and np.asarray(merged.data.counts).sum() == 1
    )
    np.testing.assert_array_equal(np.asarray(merged.cache.lengths), [0, 0, 3, 0])
    k = np.asarray(merged.cache.k)  # [L, B, S, K, H]
    np.testing.assert_array_equal(k[:, 2, :16], np.asarray(new.cache.k)[:, 0])
    assert not k[:, [0, 1, 3]].any() and not k[:, 2, 16:].any()
