"""The paged KV cache: its kernels against the float64 oracle, the decode core on it against the
dense cache, and the server's host-side pages and scheduler.

Kernels: pools with shuffled page tables, entries that hold no page, rows at different
lengths, a decode step and prompt pieces at an offset (``reference_paged_attention``); the
native CPU kernel reads the pages in place and must give the dense kernel's numbers bit for
bit. The decode core: ``PagedCache`` through ``begin``/``run`` gives ``DenseCache``'s tokens,
and a prompt prefilled in pieces (``prefill``'s ``start``) gives the whole prompt's logits.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NATIVE_DTYPES, attention_config, needs_f32, random_params
from reference import reference_paged_attention

from grok import decode
from grok.api import Model
from grok.attention import attention_temperature
from grok.decode import DenseCache, FixedSampler, PagedCache
from grok.errors import GenerationError
from grok.kernels import XlaKernels
from grok.kernels.cpu import CpuKernels, ffi
from grok.kernels.xla import paged_rows
from grok.kv_cache import LayerCache, PagedKVCache, page_slots
from grok.presets import TINY_GROK2
from grok.sampling import Sampler
from grok.serve.pages import PagePool, chain_hashes
from grok.serve.scheduler import Scheduler

# (B, T, Z, W, M, K, G, H, cap, temperature_len)
CASES = [
    (3, 1, 16, 8, 40, 2, 4, 32, 30.0, 8),  # decode; tau > 1
    (2, 37, 16, 6, 20, 2, 3, 64, None, None),  # a prompt piece at an offset; no cap
    (1, 20, 32, 3, 5, 1, 16, 16, 50.0, 16),  # G 16 > the kernel's 12-row tiles
]


def _config(case):
    *_, kh, g, h, cap, temperature_len = case
    return attention_config(kh, g, h, cap, temperature_len)


def _paged_inputs(case, dtype, seed):
    """q, a two-layer pool (layer 1 read), shuffled tables (entries past a row's pages: M,
    no page), positions and lengths (each query sees at least one key)."""
    b, t, z, w, m, kh, g, h = case[:8]
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, kh, g, h)) * 2, dtype)
    k = jnp.asarray(rng.standard_normal((2, m, z, kh, h)) * 2, dtype)
    v = jnp.asarray(rng.standard_normal((2, m, z, kh, h)), dtype)
    lengths = rng.integers(t, w * z + 1, b)
    pages = np.full((b, w), m + 3, np.int32)
    order = rng.permutation(m)
    used = 0
    for i in range(b):
        n = -(-int(lengths[i]) // z)
        pages[i, :n] = order[used % m : used % m + n] if used % m + n <= m else order[:n]
        used += n
    positions = (lengths - t)[:, None] + np.arange(t)[None]
    return q, k, v, jnp.asarray(pages), jnp.asarray(positions, jnp.int32), jnp.asarray(lengths)


def _layer(k, v, pages, dtype):
    return LayerCache(k, v, jnp.int32(1), jnp.dtype(dtype), pages)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}Z{}W{}".format(*c[:4]))
def test_xla_paged_attention_matches_float64(case):
    config = _config(case)
    for seed in range(2):
        q, k, v, pages, positions, lengths = _paged_inputs(case, jnp.float32, seed)
        tau = attention_temperature(positions, config.attn_temperature_len)
        logits = {"scale": config.attn_scale, "cap": config.attn_logit_softcapping}
        attend = jax.jit(functools.partial(XlaKernels("cpu").paged_attend, **logits))
        got = attend(q, _layer(k, v, pages, jnp.float32), tau, positions, lengths)
        want = reference_paged_attention(
            config, np.asarray(q), np.asarray(k[1]), np.asarray(v[1]), pages, positions, lengths
        )
        err = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
        assert err <= 1e-5, (seed, err)


@pytest.mark.parametrize("dtype", NATIVE_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}Z{}W{}".format(*c[:4]))
def test_native_paged_attention_is_the_dense_kernel_through_the_tables(dtype, case):
    """Bit for bit the dense kernel over the gathered keys (one arithmetic); within the dense
    kernel's tolerance of the float64 oracle."""
    config = _config(case)
    q, k, v, pages, positions, lengths = _paged_inputs(case, dtype, 0)
    tau = attention_temperature(positions, config.attn_temperature_len)
    logits = {"scale": config.attn_scale, "cap": config.attn_logit_softcapping}
    got = ffi.paged_attention(q, k, v, pages, tau, positions, lengths, index=(1,), **logits)
    keys, values = paged_rows(k, 1, pages), paged_rows(v, 1, pages)
    dense = ffi.attention(q, keys, values, tau, positions, lengths, **logits)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(dense, np.float32))
    # Through the seam, on the pool's carried form (bfloat16 as uint16 bits).
    kernels = CpuKernels()
    carried = kernels.carry(PagedKVCache(k, v))
    layer = _layer(carried.k, carried.v, pages, dtype)
    seam = kernels.paged_attend(q, layer, tau, positions, lengths, **logits)
    np.testing.assert_array_equal(np.asarray(seam, np.float32), np.asarray(got, np.float32))
    want = reference_paged_attention(
        config,
        np.asarray(q, np.float32),
        np.asarray(k[1], np.float32),
        np.asarray(v[1], np.float32),
        pages,
        positions,
        lengths,
    )
    err = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
    assert err <= (2e-5 if dtype == jnp.float32 else 1.2e-2), err


@needs_f32
def test_native_paged_kernel_refuses_what_it_cannot_read():
    q, k, v, pages, positions, lengths = _paged_inputs(CASES[0], jnp.float32, 0)
    tau = jnp.ones(positions.shape)
    with pytest.raises(ValueError, match="page size 8"):
        ffi.paged_attention(
            q,
            k[:, :, :8],
            v[:, :, :8],
            pages,
            tau,
            positions,
            lengths,
            scale=1.0,
            cap=None,
            index=(1,),
        )
    with pytest.raises(ValueError, match="pages"):
        ffi.paged_attention(
            q, k, v, pages[:1], tau, positions, lengths, scale=1.0, cap=None, index=(1,)
        )
    # A page size the kernel does not take: the seam gathers for XLA (and says so in width).
    assert CpuKernels().paged_width(3, 64, 8) == 4 and CpuKernels().paged_width(3, 64, 16) == 64


@pytest.mark.parametrize("kernels", [XlaKernels("cpu"), CpuKernels()], ids=["xla", "cpu"])
def test_paged_write_goes_through_the_tables_and_drops_what_has_no_page(kernels):
    m, z, kh, h = 6, 16, 2, 8
    config = TINY_GROK2.replace(num_key_value_heads=kh, head_dim=h)
    pool = kernels.carry(PagedKVCache.create(config, m, z, jnp.float32))
    pages = jnp.asarray([[4, 1, m], [2, m, m]], jnp.int32)  # row 1: one page
    start = jnp.asarray([14, 10], jnp.int32)
    new = jnp.arange(2 * 20 * kh * h, dtype=jnp.float32).reshape(2, 20, kh, h) + 1
    layer = LayerCache(pool.k, pool.v, jnp.int32(1), jnp.dtype(jnp.float32), pages)
    out = kernels.paged_write(layer, new, -new, start)
    k = np.asarray(out.k)
    page, offset = (np.asarray(a) for a in page_slots(pages, start, 20, z, m))
    for b in range(2):
        for t in range(20):
            if page[b, t] < m:
                np.testing.assert_array_equal(k[1, page[b, t], offset[b, t]], np.asarray(new[b, t]))
    written = sum(int((page[b] < m).sum()) for b in range(2))
    assert written == 18 + 6  # row 0: positions 14..31 (2 pages); row 1: 10..15
    assert np.count_nonzero(k[1].any(axis=(2, 3))) == written and not k[0].any()
    np.testing.assert_array_equal(np.asarray(out.v)[1], -k[1])


_HOOKS = ("apply_fn", "sampler", "store")
_begin = jax.jit(decode.begin, static_argnames=(*_HOOKS, "cache_len", "record_logits"))
_run = jax.jit(decode.run, static_argnames=_HOOKS)
_prefill = jax.jit(decode.prefill, static_argnames=(*_HOOKS, "every_position"))


@pytest.fixture(scope="module")
def model():
    return Model(TINY_GROK2, random_params(TINY_GROK2, 0), dtype=jnp.float32)


def test_decode_loop_on_the_paged_cache_equals_the_dense_cache(model):
    """``begin``/``run`` on ``PagedCache`` (pages of 16, rows in pages of their own) give the
    dense cache's tokens and logits."""
    prompts = [list(range(5, 24)), [9, 8, 7, 6, 5]]
    tokens = np.zeros((2, 32), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    keys = jax.random.key_data(decode.sequence_keys(jnp.arange(2, dtype=jnp.uint32)))
    max_new, stops = jnp.array([20, 20]), jnp.zeros((TINY_GROK2.vocab_size,), jnp.bool_)
    out = {}
    for store in (
        DenseCache(TINY_GROK2, jnp.dtype(jnp.float32), kernels=model.kernels),
        PagedCache(TINY_GROK2, jnp.dtype(jnp.float32), 16, kernels=model.kernels),
    ):
        hooks = {"apply_fn": model.apply_fn, "sampler": FixedSampler(Sampler()), "store": store}
        state = _begin(
            model.params,
            model.rope,
            jnp.asarray(tokens),
            lengths,
            keys,
            max_new,
            stops,
            cache_len=64,
            record_logits=True,
            **hooks,
        )
        state = _run(model.params, model.rope, state, jnp.int32(64), max_new, stops, **hooks)
        out[type(store).__name__] = (np.asarray(state.out), np.asarray(state.logits))
    np.testing.assert_array_equal(out["PagedCache"][0], out["DenseCache"][0])
    np.testing.assert_allclose(out["PagedCache"][1], out["DenseCache"][1], atol=1e-5)


def test_prefill_in_pieces_equals_the_whole_prompt(model):
    """A prompt prefilled in three pieces (``start``) into a paged cache: the last piece's
    logits are the whole prompt's; a piece that is not the last draws nothing."""
    store = PagedCache(TINY_GROK2, jnp.dtype(jnp.float32), 16, kernels=model.kernels)
    prompt = list(np.random.default_rng(0).integers(1, 250, 45))
    keys = jax.random.key_data(decode.sequence_keys(jnp.zeros((1,), jnp.uint32)))
    hooks = {"apply_fn": model.apply_fn, "sampler": FixedSampler(Sampler()), "store": store}
    whole_cache = store.empty(1, 64)
    _, whole, _ = _prefill(
        model.params,
        model.rope,
        whole_cache,
        jnp.asarray([prompt]),
        jnp.asarray([45]),
        keys,
        None,
        jnp.ones((1,), jnp.bool_),
        **hooks,
    )
    cache = store.empty(1, 64)
    for start, end in ((0, 20), (20, 32), (32, 45)):
        piece = np.zeros((1, 32), np.int32)
        piece[0, : end - start] = prompt[start:end]
        rows, drawn, _ = _prefill(
            model.params,
            model.rope,
            store.uncarry(cache),
            jnp.asarray(piece),
            jnp.asarray([end - start]),
            keys,
            None,
            jnp.asarray([end == 45]),
            start=jnp.asarray([start]),
            num_new=jnp.asarray([0]),
            **hooks,
        )
        cache = rows.cache
    np.testing.assert_allclose(np.asarray(drawn.logits), np.asarray(whole.logits), atol=1e-5)
    assert int(rows.position[0]) == 45 and int(rows.num_new[0]) == 1


# -- the host's pages and the scheduler ------------------------------------------------------


def test_chain_hashes_name_a_page_by_everything_before_it():
    a = chain_hashes(list(range(40)), 16)
    b = chain_hashes(list(range(32)) + [0] * 8, 16)
    c = chain_hashes([1] + list(range(1, 40)), 16)
    assert len(a) == 2 and a == b  # only full pages; the partial third is not hashed
    assert c[0] != a[0] and c[1] != a[1]  # one token earlier changes every later page


def test_page_pool_shares_counts_and_evicts_least_recently_used():
    pool = PagePool(4, 16)
    h = chain_hashes(list(range(64)), 16)
    first = pool.take(3)
    pool.publish(h[:2], first[:2])
    assert pool.match(h) == first[:2] and pool.available == 1  # held twice now
    pool.release(first)  # the first holder ends: pages 0, 1 still held, 2 free
    assert pool.available == 2
    pool.release(first[:2])  # idle in the cache, the later page evicted first
    assert pool.available == 4 and pool.cached == 2
    taken = pool.take(3)  # the free pages, then the idle page that ends the prefix
    assert set(taken) == {2, 3, first[1]} and pool.cached == 1
    assert pool.match(h) == first[:1]  # the prefix's first page is still there
    with pytest.raises(GenerationError, match="available"):
        pool.take(1)
    with pytest.raises(GenerationError, match="not held"):
        PagePool(2, 16).release([0])
    assert PagePool(2, 16, prefix_cache=False).match(h) == []


def test_scheduler_admits_by_pages_plans_pieces_and_preempts_the_newest():
    pool = PagePool(8, 16)
    sched = Scheduler(pool, slots=4, chunk=64, context=128)
    a = sched.admit("a", list(range(100)), 100, whole=False)  # 7 pages
    assert a is not None and len(a.pages) == 7 and a.cached == 0
    assert sched.admit("b", list(range(30)), 30, whole=False) is None  # 2 pages, 1 left
    b = sched.admit("b", list(range(10)), 10, whole=False)
    assert b is not None and pool.available == 0
    assert sched.plan() == [(a, 64)]  # one row of the whole budget
    sched.prefilled(a, 64)
    assert pool.cached == 4  # a's four full pages are published
    assert sched.plan() == [(a, 36)]  # [a, b] would be 2 x 64 > 64 padded tokens
    sched.prefilled(a, 36)
    assert sched.plan() == [(b, 10)]
    sched.prefilled(b, 10)
    a.cached = 112  # a's next position starts a page: b (admitted last) gives its page up
    assert sched.grow() == [b] and sched.runs[b.slot] is None and len(a.pages) == 8
    table = sched.table([a, None], 9)
    np.testing.assert_array_equal(table[0], a.pages + [8])
    assert (table[1] == 8).all()
    # A prompt the cache holds: its full pages come from there (never the last token's).
    held = list(a.pages)
    sched.release(a)
    c = sched.admit("c", list(range(64)), 64, whole=False)
    assert c.cached == 48 and c.pages[:3] == held[:3]
