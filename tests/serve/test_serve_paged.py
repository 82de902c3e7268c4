"""The engine on its paged KV cache, in process, on the built-in model in float32: prefix
caching, prompts prefilled in pieces, preemption when the pool is full, and the pool's size.

Each check compares tokens with ``Model.generate`` (greedy) or with the same request run alone
(seeded sampling with penalties): sharing pages, splitting prompts and
recomputing a preempted sequence must never change a token.
"""

import dataclasses
import threading

import jax.numpy as jnp
import numpy as np
import pytest
from test_serve import _metric

import grok
from grok.builtin import builtin_dir
from grok.errors import GenerationError
from grok.kernels import XlaKernels
from grok.serve import cli as serve_cli
from grok.serve.engine import Engine
from grok.serve.metrics import Metrics
from grok.serve.sequence import SamplingParams, SequenceRequest
from grok.sharding import MODEL, make_mesh
from grok.tokenizer import load_tokenizer

GREEDY = SamplingParams(max_tokens=12, temperature=0, logprobs=0)


@pytest.fixture(scope="module")
def built():
    model = grok.load_pretrained("builtin", dtype=jnp.float32, quiet=True)
    return model, load_tokenizer(builtin_dir())


def _generate(engine, prompts, params, waves=1):
    """Runs ``prompts`` through a started engine in ``waves`` (each submitted once the one before
    it finished); returns every sequence's tokens, in order."""
    got = [[] for _ in prompts]
    per_wave = -(-len(prompts) // waves)
    for w in range(waves):
        index = range(w * per_wave, min(len(prompts), (w + 1) * per_wave))
        left, done = set(index), threading.Event()

        def sink_for(i, left=left, done=done):
            def sink(update):
                assert update.error is None, update.error
                got[i].extend(t.token for t in update.tokens)
                if update.finish_reason is not None:
                    left.discard(i)
                    if not left:
                        done.set()

            return sink

        seqs = [
            SequenceRequest(prompts[i], params[i], sink_for(i), engine.tokenizer, index=i)
            for i in index
        ]
        engine.submit(seqs)
        assert done.wait(120)
    return got


def test_prefix_cache_and_pieces_keep_generates_tokens(built):
    """Prompts sharing a 40-token prefix, prefilled 32 tokens at a time: with the prefix cache
    (a second wave reads the first's pages) and without it, the greedy tokens are
    ``Model.generate``'s."""
    model, tok = built
    rng = np.random.default_rng(0)
    prefix = rng.integers(3, 2000, 40).tolist()
    prompts = [prefix + rng.integers(3, 2000, n).tolist() for n in (3, 30, 7, 19)]
    want = [list(t) for t in model.generate(prompts, max_new_tokens=12).tokens]
    for prefix_cache in (True, False):
        metrics = Metrics(4)
        engine = Engine(
            model, tok, max_batch=4, prefill_chunk=32, prefix_cache=prefix_cache, metrics=metrics
        )
        engine.start()
        try:
            got = _generate(engine, prompts, [GREEDY] * 4, waves=2)
        finally:
            engine.stop()
        assert got == want, prefix_cache
        text = metrics.render()[0].decode()
        hits = _metric(text, "grok_prefix_cache_hit_tokens_total")
        assert hits == (64 if prefix_cache else 0)  # wave 2: the prefix's two full pages each
        assert _metric(text, "grok_prefix_cache_query_tokens_total") == (
            sum(map(len, prompts)) if prefix_cache else 0
        )
        assert _metric(text, "grok_kv_cache_usage") == 0  # everything given back


def test_preemption_recomputes_without_changing_a_token(built):
    """Three sequences of 50 tokens in a pool of 64 (four pages): they preempt each other, and
    each ends with the tokens it gets alone (greedy: ``Model.generate``'s; sampled with a
    seed and penalties: the same request alone in the pool)."""
    model, tok = built
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 2000, 20).tolist() for _ in range(3)]
    sampled = SamplingParams(
        max_tokens=30, temperature=0.9, seed=5, frequency_penalty=0.8, presence_penalty=0.5
    )
    greedy = SamplingParams(max_tokens=30, temperature=0, logprobs=0)
    params = [greedy, sampled, greedy]
    pool = {"max_batch": 3, "max_context": 64, "kv_cache_tokens": 64}  # the shapes compile once
    alone = Engine(model, tok, **pool)
    alone.start()
    try:
        want_sampled = _generate(alone, prompts[1:2], [sampled])[0]
    finally:
        alone.stop()
    metrics = Metrics(3)
    engine = Engine(model, tok, metrics=metrics, **pool)
    engine.start()
    try:
        got = _generate(engine, prompts, params)
    finally:
        engine.stop()
    want = model.generate(prompts, max_new_tokens=30).tokens  # greedy: rows 0 and 2 count
    assert [got[0], got[2]] == [list(want[0]), list(want[2])]
    assert got[1] == want_sampled
    text = metrics.render()[0].decode()
    assert _metric(text, "grok_preemptions_total") >= 1
    assert _metric(text, "grok_kv_cache_pages") == 4


def test_pool_size_flags_and_errors(built):
    model, tok = built
    with pytest.raises(GenerationError, match="fewer than one sequence of max_context 128"):
        Engine(model, tok, max_context=128, kv_cache_tokens=100)
    engine = Engine(model, tok, max_batch=2, max_context=100, kv_cache_tokens=1000)
    assert engine.kv_cache_tokens == 992  # whole pages of 16
    # By default: what fits beside the weights, at most --max-batch whole contexts.
    assert Engine(model, tok, max_batch=3, max_context=256).kv_cache_tokens == 768
    args = serve_cli.build_parser().parse_args(
        ["--kv-cache-tokens", "4096", "--prefill-chunk", "256", "--no-prefix-cache"]
    )
    assert (args.kv_cache_tokens, args.prefill_chunk, args.prefix_cache) == (4096, 256, False)
    defaults = serve_cli.build_parser().parse_args([])
    assert (defaults.kv_cache_tokens, defaults.prefill_chunk, defaults.prefix_cache) == (
        None,
        256,
        True,
    )


def test_engine_on_a_mesh_reads_pages_through_xla():
    """On a 1x2 mesh (the XLA kernels: page tables of a few compiled widths, the pool's kv
    heads split over the model axis), the engine gives ``Model.generate``'s tokens."""
    mesh = make_mesh(1, 2)
    model = grok.load_pretrained("builtin", dtype=jnp.float32, mesh=mesh, quiet=True)
    tok = load_tokenizer(builtin_dir())
    assert isinstance(model.kernels, XlaKernels)
    prompts = [np.random.default_rng(2).integers(3, 2000, n).tolist() for n in (20, 25)]
    want = [list(t) for t in model.generate(prompts, max_new_tokens=6).tokens]
    engine = Engine(model, tok, max_batch=2, max_context=128, prefill_chunk=64)
    engine.start()
    try:
        got = _generate(engine, prompts, [dataclasses.replace(GREEDY, max_tokens=6)] * 2)
    finally:
        engine.stop()
    assert got == want
    assert engine._state.cache.k.sharding.spec[3] == MODEL


def test_cli_refuses_a_pool_smaller_than_one_context(capsys):
    assert serve_cli.main(["--max-context", "256", "--kv-cache-tokens", "100"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "grok-serve: error: --kv-cache-tokens 100 holds less than one sequence of --max-context 256"
    )
