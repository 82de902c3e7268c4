"""Tests of grok.sampling: greedy, temperature, top-k, top-p and min-p, under jit."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok.errors import GenerationError
from grok.sampling import Sampler, greedy

NUM_KEYS = 400  # draws per check over many keys


def _draws(sampler: Sampler, logits: jax.Array, num: int = NUM_KEYS, seed: int = 0) -> np.ndarray:
    """int32[num, B]: one jitted draw per key."""
    keys = jax.random.split(jax.random.key(seed), num)
    return np.asarray(jax.jit(jax.vmap(sampler.sample, in_axes=(None, 0)))(logits, keys))


def _log_probs(probs) -> jax.Array:
    return jnp.log(jnp.asarray(probs, jnp.float32))[None, :]  # [1, V]


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -0.1}, "temperature must be a finite number >= 0, got -0.1"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"temperature": "1"}, "temperature must be a finite number"),
        ({"temperature": True}, "temperature must be a finite number"),
        ({"top_k": 0}, "top_k must be an int >= 1 or None, got 0"),
        ({"top_k": -3}, "top_k must be an int >= 1"),
        ({"top_k": 2.0}, "top_k must be an int >= 1"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\] or None, got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_p": -0.2}, r"top_p must be in \(0, 1\]"),
        ({"min_p": 1.1}, r"min_p must be in \[0, 1\] or None, got 1.1"),
        ({"min_p": -0.1}, r"min_p must be in \[0, 1\]"),
    ],
)
def test_invalid_settings(kwargs, match):
    with pytest.raises(GenerationError, match=match):
        Sampler(**kwargs)


def test_sampler_is_frozen_and_hashable():
    s = Sampler(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05)
    assert hash(s) == hash(Sampler(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05))
    with pytest.raises(AttributeError):
        s.temperature = 1.0  # type: ignore[misc]


def test_logits_must_be_2d():
    with pytest.raises(GenerationError, match=r"logits \[B, V\], got shape \(5,\)"):
        Sampler(temperature=1.0).sample(jnp.zeros(5), jax.random.key(0))


# --- greedy --------------------------------------------------------------------------------


def test_greedy_ties_break_to_lowest_id():
    logits = jnp.array([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, -1.0, -9.0]])
    assert greedy(logits).tolist() == [1, 0, 0]
    assert greedy(logits).dtype == jnp.int32


def test_greedy_infinities_and_nan_stay_in_range():
    inf, nan = jnp.inf, jnp.nan
    logits = jnp.array(
        [[-inf, -inf, -inf], [1.0, inf, inf], [-inf, 2.0, -inf], [nan, 1.0, nan], [1.0, nan, 3.0]]
    )
    assert greedy(logits).tolist() == [0, 1, 1, 0, 0]


def test_greedy_equals_numpy_argmax_on_random_rows():
    logits = jax.random.normal(jax.random.key(3), (16, 32000))
    logits = logits.at[5, 7].set(logits[5].max()).at[5, 9].set(logits[5].max() + 1.0)
    np.testing.assert_array_equal(greedy(logits), np.argmax(np.asarray(logits), axis=-1))


def test_temperature_zero_is_greedy_and_ignores_key():
    logits = jax.random.normal(jax.random.key(1), (6, 50))
    expected = np.argmax(np.asarray(logits), axis=-1)
    for seed in range(3):
        got = Sampler().sample(logits, jax.random.key(seed))
        np.testing.assert_array_equal(got, expected)
    # Filters do not change a greedy pick: the maximum survives all of them.
    got = Sampler(temperature=0.0, top_k=5, top_p=0.5, min_p=0.3).sample(logits, jax.random.key(0))
    np.testing.assert_array_equal(got, expected)


def test_top_k_one_equals_greedy_with_ties():
    logits = jax.random.normal(jax.random.key(2), (8, 64))
    logits = logits.at[:, 10].set(9.0).at[:, 40].set(9.0)  # a tie for the top, lower id is 10
    sampler = Sampler(temperature=1.5, top_k=1)
    assert sampler.is_greedy
    for seed in range(3):
        np.testing.assert_array_equal(sampler.sample(logits, jax.random.key(seed)), greedy(logits))
    np.testing.assert_array_equal(greedy(logits), np.full(8, 10))


def test_tiny_temperature_is_finite_and_picks_the_maximum():
    logits = jnp.array([[1.0, 3.0, 2.0], [200.0, -50.0, 199.0]])
    got = _draws(Sampler(temperature=1e-30, top_p=0.9, min_p=0.1), logits, num=20)
    np.testing.assert_array_equal(got, np.tile([1, 0], (20, 1)))


# --- randomness ----------------------------------------------------------------------------


def test_same_key_same_tokens_different_keys_differ():
    logits = jnp.zeros((8, 1000))  # flat: every token equally likely
    sampler = Sampler(temperature=1.0)
    a = sampler.sample(logits, jax.random.key(7))
    b = sampler.sample(logits, jax.random.key(7))
    c = sampler.sample(logits, jax.random.key(8))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == jnp.int32 and a.shape == (8,)
    assert not np.array_equal(a, c)
    assert len(set(np.asarray(a).tolist())) > 1  # rows draw independently


def test_frequencies_follow_tempered_softmax():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = _log_probs(probs)
    for temperature in (1.0, 2.0):
        draws = _draws(Sampler(temperature=temperature), logits, num=4000)[:, 0]
        freq = np.bincount(draws, minlength=4) / draws.size
        tempered = probs ** (1 / temperature) / np.sum(probs ** (1 / temperature))
        np.testing.assert_allclose(freq, tempered, atol=0.03)


# --- filters never pick an excluded token --------------------------------------------------

PROBS = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]  # sorted, ids 0..5


@pytest.mark.parametrize(
    ("sampler", "allowed"),
    [
        (Sampler(temperature=1.0, top_k=3), {0, 1, 2}),
        # mass above each token: 0, .4, .65, .8, .9, .96 -> kept while < p
        (Sampler(temperature=1.0, top_p=0.6), {0, 1}),
        (Sampler(temperature=1.0, top_p=0.75), {0, 1, 2}),
        (Sampler(temperature=1.0, top_p=0.05), {0}),
        # p >= min_p * 0.4
        (Sampler(temperature=1.0, min_p=0.3), {0, 1, 2}),
        (Sampler(temperature=1.0, min_p=0.2), {0, 1, 2, 3}),
        # top-k then top-p: among the top 4 (renormalised .444 .278 .167 .111) mass above
        # is 0, .444, .722, .889 -> p=.75 keeps 3
        (Sampler(temperature=1.0, top_k=4, top_p=0.75), {0, 1, 2}),
        (Sampler(temperature=1.0, top_k=5, min_p=0.5), {0, 1}),
        (Sampler(temperature=1.0, top_p=0.95, min_p=0.2), {0, 1, 2, 3}),
    ],
    ids=lambda x: repr(x) if isinstance(x, Sampler) else None,
)
def test_filters_keep_exactly_the_allowed_tokens(sampler, allowed):
    # The same distribution in two rows, the second with ids permuted, so that filters must
    # follow the logits and not the positions.
    perm = np.array([3, 5, 0, 4, 1, 2])  # token at id perm[i] has probability PROBS[i]
    row2 = np.zeros(6, np.float32)
    row2[perm] = PROBS
    logits = jnp.concatenate([_log_probs(PROBS), _log_probs(row2)], axis=0)  # [2, 6]
    draws = _draws(sampler, logits)
    assert set(draws[:, 0].tolist()) == allowed
    assert set(draws[:, 1].tolist()) == {int(perm[i]) for i in allowed}


def test_top_k_ties_at_the_cut_keep_lower_ids():
    logits = jnp.array([[1.0, 5.0, 3.0, 3.0, 3.0, 0.0]])
    draws = _draws(Sampler(temperature=1.0, top_k=2), logits)
    assert set(draws[:, 0].tolist()) == {1, 2}


def test_top_p_one_and_min_p_zero_keep_everything():
    logits = _log_probs(PROBS)
    for sampler in (Sampler(temperature=1.0, top_p=1.0), Sampler(temperature=1.0, min_p=0.0)):
        assert np.all(np.isfinite(sampler.filtered_logits(logits)))


def _reference_filter(logits: np.ndarray, s: Sampler) -> np.ndarray:
    """NumPy version of the filters, one row at a time, for comparison."""
    out = np.full_like(logits, -np.inf)
    for b, row in enumerate(logits.astype(np.float64)):
        scaled = (row - row.max()) / s.temperature
        order = np.argsort(-scaled, kind="stable")
        keep = np.zeros(row.size, bool)
        keep[order[: s.top_k or row.size]] = True
        if s.top_p is not None:
            kept = order[keep[order]]
            p = np.exp(scaled[kept] - scaled[kept].max())
            p /= p.sum()
            above = np.cumsum(p) - p
            keep[:] = False
            keep[kept[above < s.top_p]] = True
        if s.min_p is not None:
            keep &= scaled >= scaled.max() + np.log(s.min_p)
        out[b, keep] = scaled[keep]
    return out


@pytest.mark.parametrize(
    "sampler",
    [
        Sampler(temperature=0.7),
        Sampler(temperature=1.3, top_k=17),
        Sampler(temperature=0.9, top_p=0.8),
        Sampler(temperature=1.0, min_p=0.1),
        Sampler(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05),
        Sampler(temperature=1.0, top_k=500, top_p=0.9),  # k > V: top-k is a no-op
    ],
    ids=repr,
)
def test_filtered_logits_match_numpy_reference(sampler):
    logits = 3.0 * jax.random.normal(jax.random.key(3), (4, 100))
    got = np.asarray(sampler.filtered_logits(logits))
    want = _reference_filter(np.asarray(logits), sampler)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-5)


def test_greedy_filtered_logits_leave_one_token():
    logits = jnp.array([[0.0, 2.0, 2.0, 1.0]])
    got = np.asarray(Sampler().filtered_logits(logits))
    np.testing.assert_array_equal(got, [[-np.inf, 0.0, -np.inf, -np.inf]])


# --- jit -----------------------------------------------------------------------------------


def test_works_under_jit_as_closure_and_static_argument():
    logits = jax.random.normal(jax.random.key(4), (3, 257)).astype(jnp.bfloat16)
    key = jax.random.key(5)
    sampler = Sampler(temperature=0.8, top_k=50, top_p=0.9, min_p=0.02)
    eager = sampler.sample(logits, key)

    closed = jax.jit(sampler.sample)(logits, key)

    @functools.partial(jax.jit, static_argnums=0)
    def step(s: Sampler, x: jax.Array, k: jax.Array) -> jax.Array:
        return s.sample(x, k)

    np.testing.assert_array_equal(closed, eager)
    np.testing.assert_array_equal(step(sampler, logits, key), eager)
    np.testing.assert_array_equal(step(Sampler(), logits, key), greedy(logits))
    assert closed.dtype == jnp.int32 and closed.shape == (3,)
