"""Generation: prefill + cached decode against the full forward pass, batching, stops, seeds.

Every test shares one float32 TINY_GROK2 model with random weights, and the calls are shaped
so that they share a few compiled prefill/decode programs (prompts of 3, 7 and 12 tokens all
land in the 16-token prompt bucket; 122 new tokens make a 128-slot cache).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params

from grok.api import Model
from grok.errors import GenerationError, TokenizerError
from grok.generate import MIN_BUCKET, bucket_length
from grok.presets import TINY_GROK2
from grok.sampling import Sampler

CONFIG = TINY_GROK2  # attn_temperature_len 4, context 128
PROMPTS = [
    [5, 17, 200],
    [9, 8, 7, 6, 5, 4, 3],
    [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111],
]
MAX_NEW = 122  # 3 + 122 < 128, so only the 7- and 12-token prompts fill the context


@pytest.fixture(scope="module")
def model():
    return Model(CONFIG, random_params(CONFIG, 0), dtype=jnp.float32)


@pytest.fixture(scope="module")
def greedy_batch(model):
    return model.generate(PROMPTS, max_new_tokens=MAX_NEW, return_logits=True)


def test_bucket_length():
    assert bucket_length(1, 128) == MIN_BUCKET
    assert bucket_length(16, 128) == 16
    assert bucket_length(17, 128) == 32
    assert bucket_length(100, 128) == 128
    assert bucket_length(100, 100) == 100  # capped at the context
    with pytest.raises(GenerationError, match="do not fit"):
        bucket_length(129, 128)


def test_prefill_then_decode_equals_full_forward(model, greedy_batch):
    result = greedy_batch
    assert result.prompt_lengths == [3, 7, 12]
    # The 7- and 12-token prompts run into the end of the context; the 3-token one stops at
    # max_new_tokens first.
    assert result.finish_reasons == ["length", "context", "context"]
    assert [len(t) for t in result.tokens] == [MAX_NEW, 128 - 7, 128 - 12]
    # One full forward pass over the three sequences, right-padded to the context: attention
    # is causal, so the padding changes no logits before it.
    rows = [prompt + new for prompt, new in zip(PROMPTS, result.tokens, strict=True)]
    padded = np.array([r + [0] * (CONFIG.max_position_embeddings - len(r)) for r in rows])
    everything = np.asarray(model.logits(padded))  # [3, P, V]
    for b, (prompt, new, logits) in enumerate(
        zip(PROMPTS, result.tokens, result.logits, strict=True)
    ):
        n = len(prompt)
        full = everything[b, : n + len(new)]  # [n + len(new), V]
        # The logits of new token i are those of position n - 1 + i (12 > 4 = the
        # attn_temperature_len, so decode positions all run with tau != 1).
        want = full[n - 1 : n - 1 + len(new)]
        assert logits.shape == want.shape
        rel = np.abs(logits - want).max(axis=-1) / np.abs(want).max(axis=-1)  # per step
        assert rel.max() < 1e-5, f"prompt of {n}: worst step {rel.argmax()} rel err {rel.max()}"
        np.testing.assert_array_equal(np.argmax(want, axis=-1), new)  # greedy picks


def test_batch_gives_each_sequence_its_tokens_alone(model, greedy_batch):
    for prompt, new in zip(PROMPTS, greedy_batch.tokens, strict=True):
        alone = model.generate([prompt], max_new_tokens=MAX_NEW)
        assert alone.tokens == [new]


def test_streaming_sees_every_token_in_order(model, greedy_batch):
    seen = {0: [], 1: [], 2: []}
    result = model.generate(
        PROMPTS,
        max_new_tokens=MAX_NEW,
        on_token=lambda b, t: seen[b].append(t),
        return_logits=True,
    )
    assert result.tokens == greedy_batch.tokens
    assert [seen[b] for b in range(3)] == greedy_batch.tokens
    assert result.time_to_first_token_s > 0 and result.decode_time_s > 0
    assert result.num_decode_tokens == sum(len(t) - 1 for t in result.tokens)
    assert result.decode_tokens_per_s > 0


def test_each_sequence_stops_at_its_own_stop_token(model, greedy_batch):
    row0 = greedy_batch.tokens[0]
    stop = row0[4]
    first = row0.index(stop)
    result = model.generate(PROMPTS, max_new_tokens=MAX_NEW, stop_tokens=[stop], return_logits=True)
    assert result.tokens[0] == row0[:first]
    assert result.finish_reasons[0] == "stop" and result.stop_tokens[0] == stop
    for b in (1, 2):  # the others run on until they sample it themselves, if ever
        expected = greedy_batch.tokens[b]
        if stop in expected:
            assert result.tokens[b] == expected[: expected.index(stop)]
            assert result.finish_reasons[b] == "stop"
        else:
            assert result.tokens[b] == expected and result.stop_tokens[b] is None


def test_max_new_tokens_and_full_context(model):
    long_prompt = list(range(3, 128))  # 125 tokens: room for 3 more positions
    result = model.generate([long_prompt], max_new_tokens=10)
    assert len(result.tokens[0]) == 3 and result.finish_reasons == ["context"]
    full = model.generate([list(range(128))], max_new_tokens=10)
    assert full.tokens == [[]] and full.finish_reasons == ["context"]
    none = model.generate([long_prompt], max_new_tokens=0)
    assert none.tokens == [[]] and none.finish_reasons == ["length"]


def test_top_k_1_and_temperature_0_are_greedy(model, greedy_batch):
    for sampler in (Sampler(temperature=1.5, top_k=1), Sampler(temperature=0.0, top_p=0.5)):
        result = model.generate([PROMPTS[2]], max_new_tokens=MAX_NEW, sampler=sampler, seed=3)
        assert result.tokens == [greedy_batch.tokens[2]]


def test_seeds(model):
    sampler = Sampler(temperature=1.0)

    def run(prompts, seed):  # 20 new tokens: every call here uses the 32-slot cache
        return model.generate(prompts, max_new_tokens=20, sampler=sampler, seed=seed).tokens

    assert run([PROMPTS[1]], [1]) == run([PROMPTS[1]], [1])
    assert run([PROMPTS[1]], [1]) != run([PROMPTS[1]], [2])
    # With one seed per prompt a sequence draws the same tokens in a batch as alone.
    batch = run(PROMPTS, [11, 12, 13])
    for b, seed in enumerate([11, 12, 13]):
        assert run([PROMPTS[b]], [seed]) == [batch[b]]
    # One seed for the whole batch: reproducible, and the rows get different draws.
    same_prompt = [PROMPTS[0]] * 3
    shared = run(same_prompt, 5)
    assert shared == run(same_prompt, 5)
    assert shared[0] != shared[1] and shared[1] != shared[2]


@pytest.mark.parametrize(
    ("prompts", "kwargs", "error", "match"),
    [
        ([], {}, GenerationError, "empty"),
        ([[1, 2], []], {}, GenerationError, "prompt 1 is empty"),
        (["hello"], {}, GenerationError, "encode it"),
        ([list(range(129))], {}, GenerationError, "129 tokens, more than the context"),
        ([[1, 256]], {}, TokenizerError, "256 is outside"),
        ([[1]], {"max_new_tokens": -1}, GenerationError, "max_new_tokens"),
        ([[1]], {"seed": -1}, GenerationError, "seed"),
        ([[1], [2]], {"seed": [1]}, GenerationError, "one per prompt"),
        ([[1]], {"stop_tokens": [300]}, GenerationError, "stop token 300"),
        ([[1]], {"sampler": "greedy"}, GenerationError, "Sampler"),
    ],
)
def test_bad_requests(model, prompts, kwargs, error, match):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(error, match=match):
        model.generate(prompts, **kwargs)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs several (host) devices")
def test_sharded_params_give_the_same_tokens(model):
    """Parameters sharded over a mesh (nothing moved to one device): same seed, same tokens."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:2]), ("model",))

    def shard(x):  # split the last dim of every matrix over the mesh
        spec = [None] * (x.ndim - 1) + ["model" if x.ndim >= 2 else None]
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))

    sharded = Model(CONFIG, jax.tree.map(shard, model.params), dtype=jnp.float32, mesh=mesh)
    sampler = Sampler(temperature=1.0)
    kwargs = {"max_new_tokens": 20, "sampler": sampler, "seed": [11, 12, 13]}
    assert sharded.generate(PROMPTS, **kwargs).tokens == model.generate(PROMPTS, **kwargs).tokens


@pytest.mark.parametrize("stream", [False, True])
def test_non_finite_logits_raise(model, stream):
    """A broken weight (NaN) makes every logit NaN: generate raises instead of returning the
    argmax of NaNs (token 0) forever, and a stream sees no token at all."""
    params = {m: dict(t) for m, t in model.params.items()}
    params["grok/final_norm"]["weight"] = jnp.full_like(
        params["grok/final_norm"]["weight"], jnp.nan
    )
    broken = Model(CONFIG, params, dtype=jnp.float32)
    seen = []
    on_token = (lambda b, t: seen.append(t)) if stream else None
    with pytest.raises(GenerationError, match="non-finite logits .* sequence 0"):
        broken.generate(PROMPTS[:1], max_new_tokens=MAX_NEW, on_token=on_token)
    assert seen == []


def test_compile_time_is_reported_apart(model):
    """The first call of new shapes reports its compile time; a repeat compiles nothing."""
    first = model.generate(
        [[1, 2]], max_new_tokens=3, sampler=Sampler(temperature=0.5, min_p=0.125)
    )
    again = model.generate(
        [[1, 2]], max_new_tokens=3, sampler=Sampler(temperature=0.5, min_p=0.125)
    )
    assert first.prefill_compile_s > 0 and first.decode_compile_s > 0
    assert first.compile_s > again.compile_s
    assert again.time_to_first_token_s > again.prefill_compile_s
