"""The model against the float64 reference, and its components against the spec.

The reference (tests/reference.py) is written from the spec alone; here tiny checkpoints in
the released layout are written, loaded through ``grok.load_pretrained`` and compared.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params
from reference import random_tensors, reference_logits

import grok
from grok.attention import attention_temperature
from grok.kv_cache import KVCache
from grok.model import forward_fns, init_params
from grok.moe import moe_blocks, moe_dense_reference, moe_gather, route
from grok.params import weight_specs
from grok.presets import GROK1, GROK2, TINY_GROK1, TINY_GROK2
from grok.rope import apply_rope, original_inv_freq, rope_table, rope_table_np, yarn_inv_freq
from grok.testing import write_checkpoint

MAX_REL_ERR = 1e-4


def _compare(config, seed, tmp_path, batch=2, length=12):
    tensors = random_tensors(config, seed)
    path = write_checkpoint(tmp_path / f"ckpt{seed}", config, tensors)
    model = grok.load_pretrained(path, dtype=jnp.float32)
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length))
    got = np.asarray(model.logits(tokens), np.float64)
    want = reference_logits(config, tensors, tokens)
    assert got.shape == want.shape == (batch, length, config.vocab_size)
    rel = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert rel < MAX_REL_ERR, rel
    return got


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grok2_matches_reference(seed, tmp_path):
    assert TINY_GROK2.attn_temperature_len < 12  # the temperature acts on later positions
    _compare(TINY_GROK2, seed, tmp_path)


@pytest.mark.parametrize("seed", [0, 1])
def test_grok1_preset_matches_reference(seed, tmp_path):
    _compare(TINY_GROK1, seed, tmp_path)


VARIANTS = {
    "no_attn_cap": dict(attn_logit_softcapping=None),
    "no_router_cap": dict(router_logit_softcapping=None),
    "no_final_cap": dict(final_logit_softcapping=None),
    "no_temperature": dict(attn_temperature_len=None),
    "yarn": dict(rope_type="yarn"),
    "gelu_tanh": dict(hidden_act="gelu_tanh"),
    "renormalize": dict(moe_router_renormalize=True),
    "mha": dict(num_key_value_heads=4),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_match_reference(variant, tmp_path):
    """Each knob, switched, still matches the reference (and so is read from the config)."""
    config = TINY_GROK2.replace(**VARIANTS[variant])
    got = _compare(config, 3, tmp_path)
    base = _base_logits(tmp_path / "base")
    assert not np.allclose(got, base), f"{variant} did not change the logits"


_BASE: dict[str, np.ndarray] = {}


def _base_logits(path):
    if "base" not in _BASE:
        _BASE["base"] = _compare(TINY_GROK2, 3, path)
    return _BASE["base"]


def test_bfloat16_close_to_float32(tmp_path):
    tensors = random_tensors(TINY_GROK2, 0)
    path = write_checkpoint(tmp_path / "c", TINY_GROK2, tensors, dtype=jnp.bfloat16)
    tokens = np.arange(10)[None] % TINY_GROK2.vocab_size
    f32 = np.asarray(grok.load_pretrained(path, dtype=jnp.float32).logits(tokens))
    bf16 = grok.load_pretrained(path, dtype=jnp.bfloat16)
    assert bf16.params["grok/layers/layer/attn"]["q_proj"].dtype == jnp.bfloat16
    assert bf16.params["grok/layers/layer/moe"]["router"].dtype == jnp.float32
    got = np.asarray(bf16.logits(tokens))
    assert got.dtype == np.float32
    # Routing can flip on near-ties in bf16; most logits stay close.
    assert np.mean(np.abs(got - f32) < 0.1 * TINY_GROK2.final_logit_softcapping) > 0.9


def test_bad_tokens_are_refused(tmp_path, hf_tensors):
    path = write_checkpoint(tmp_path / "c", TINY_GROK2, hf_tensors(TINY_GROK2))
    model = grok.load_pretrained(path, dtype=jnp.float32)
    with pytest.raises(grok.TokenizerError, match="256"):
        model.logits(np.array([[1, 256]]))
    with pytest.raises(grok.GenerationError, match="more than the context"):
        model.logits(np.zeros((1, TINY_GROK2.max_position_embeddings + 1), np.int32))


# Parameter tree and sizes.


@pytest.mark.parametrize("config", [TINY_GROK2, TINY_GROK1])
def test_weight_table_matches_init_tree(config):
    params = jax.eval_shape(lambda: init_params(config))  # the tree and shapes, no values
    flat = {(m, n): a for m, sub in params.items() for n, a in sub.items()}
    specs = {(s.module, s.name): s for s in weight_specs(config)}
    assert flat.keys() == specs.keys()
    for key, spec in specs.items():
        assert flat[key].shape == spec.shape, key
        assert len(spec.axes) == len(spec.shape), key


def _eval_shape_count(config):
    fns = forward_fns(config, jnp.dtype(jnp.bfloat16))
    tokens = jnp.zeros((1, 1), jnp.int32)
    rope = jax.ShapeDtypeStruct((config.max_position_embeddings, config.head_dim // 2), jnp.float32)
    shapes = jax.eval_shape(
        fns.init,
        jax.random.PRNGKey(0),
        tokens,
        tokens,
        grok.rope.RopeTable(rope, rope),
        None,
        jnp.ones((1,), jnp.int32),
    )
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


def test_full_size_parameter_counts():
    assert _eval_shape_count(GROK2) == 269_515_497_472
    assert _eval_shape_count(GROK1) == 315_684_820_992


# Attention.


def test_gqa_shapes_and_cache_holds_kv_heads_only():
    cfg = TINY_GROK2
    params = random_params(cfg)
    fns = forward_fns(cfg, jnp.dtype(jnp.float32))
    cache = KVCache.create(cfg, batch_size=2, max_len=16, dtype=jnp.float32)
    assert cache.k.shape == (cfg.num_hidden_layers, 2, 16, cfg.num_key_value_heads, cfg.head_dim)
    tokens = jnp.ones((2, 5), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
    logits, new = jax.jit(fns.apply)(
        params, tokens, positions, rope_table(cfg), cache, jnp.array([5, 5], jnp.int32)
    )
    assert logits.shape == (2, 5, cfg.vocab_size)
    assert new.k.shape == cache.k.shape and new.v.shape == cache.v.shape
    assert new.k.shape[3] == cfg.num_key_value_heads < cfg.num_attention_heads
    assert np.any(np.asarray(new.k[:, :, :5]) != 0) and np.all(np.asarray(new.k[:, :, 5:]) == 0)


def test_attention_temperature():
    pos = jnp.array([[0, 1, 4, 5, 16, 1024]])
    tau = np.asarray(attention_temperature(pos, 4))
    np.testing.assert_allclose(tau, [[1, 1, 1, np.log2(5) / 2, 2.0, 5.0]], rtol=1e-6)
    assert np.all(np.asarray(attention_temperature(pos, None)) == 1)


# Router.


def test_router_deterministic_and_ties_to_lower_index():
    x = jnp.ones((3, 4))
    w = jnp.zeros((8, 4))  # [E, D]: every expert ties
    weights, experts, probs = route(x, w, cap=30.0, k=2)
    np.testing.assert_array_equal(np.asarray(experts), [[0, 1]] * 3)
    np.testing.assert_allclose(np.asarray(weights), 1 / 8)
    w = w.at[5].set(1.0).at[6].set(1.0)  # experts 5 and 6 tie above the rest
    _, experts, _ = route(x, w, cap=30.0, k=2)
    np.testing.assert_array_equal(np.asarray(experts), [[5, 6]] * 3)
    key = jax.random.PRNGKey(0)
    xr, wr = jax.random.normal(key, (16, 4)), jax.random.normal(jax.random.PRNGKey(1), (8, 4))
    a, b = route(xr, wr, cap=1.0, k=2), route(xr, wr, cap=1.0, k=2)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_router_weights_not_renormalised():
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 4))
    w = jax.random.normal(jax.random.PRNGKey(1), (8, 4))
    weights, experts, probs = route(x, w, cap=None, k=2)
    np.testing.assert_allclose(
        np.asarray(weights), np.take_along_axis(np.asarray(probs), np.asarray(experts), 1)
    )
    assert np.all(np.asarray(weights).sum(-1) < 1)
    renorm, _, _ = route(x, w, cap=None, k=2, renormalize=True)
    np.testing.assert_allclose(np.asarray(renorm).sum(-1), 1, rtol=1e-6)


@pytest.mark.parametrize("m", [1, 3, 40])
def test_moe_paths_equal_dense_oracle(m):
    rng = np.random.default_rng(m)
    e, d, f = 8, 16, 24
    x = rng.standard_normal((m, d), np.float32)
    w1 = rng.standard_normal((e, f, d), np.float32) / 4  # [E, F, D]: [out, in]
    w3 = rng.standard_normal((e, f, d), np.float32) / 4
    w2 = rng.standard_normal((e, d, f), np.float32) / 5
    w_gate = rng.standard_normal((e, d), np.float32)

    @jax.jit  # one program for the routing, the oracle and both paths
    def paths(x, w_gate, w1, w3, w2):
        weights, experts, _ = route(x, w_gate, cap=None, k=2)
        args = (x, weights, experts, w1, w3, w2, jax.nn.gelu)
        return moe_dense_reference(*args), [fn(*args) for fn in (moe_gather, moe_blocks)]

    want, got = paths(x, w_gate, w1, w3, w2)
    for out in got:
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)


# Rotary embedding.


def test_rope_matches_grok1_rotation_below_8192():
    """Grok-1's rotation: rotate-half with inv_freq = 1 / 10000^(arange(0, H, 2) / H)."""
    cfg = GROK1
    h = cfg.head_dim
    positions = np.arange(8192)
    exponents = np.arange(0, h, 2, dtype=np.float64) / h
    phase = positions[:, None] * (1.0 / (10000.0**exponents))[None]  # [P, H/2]
    phase = np.concatenate([phase, phase], axis=-1)  # Grok-1 duplicates the phase
    x = np.random.default_rng(0).standard_normal((1, 8192, 1, h))
    rotate_half = np.concatenate([-x[..., h // 2 :], x[..., : h // 2]], axis=-1)
    want = x * np.cos(phase)[None, :, None] + rotate_half * np.sin(phase)[None, :, None]

    table = rope_table(cfg, 8192)
    assert table.cos.shape == (8192, h // 2)
    got = apply_rope(
        jnp.asarray(x, jnp.float32), table.cos[positions][None], table.sin[positions][None]
    )
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
    # Grok-1 itself computed the phase in float32; it agrees to float32's resolution.
    phase32 = positions[:, None].astype(np.float32) * (
        1.0 / (np.float32(10000.0) ** (np.arange(0, h, 2, dtype=np.float32) / h))
    )
    np.testing.assert_allclose(np.asarray(table.cos), np.cos(phase32.astype(np.float64)), atol=1e-3)


def test_rope_table_spans_the_context_and_keeps_precision():
    cos, sin = rope_table_np(GROK2)
    assert cos.shape == (GROK2.max_position_embeddings, GROK2.head_dim // 2)
    inv = original_inv_freq(GROK2.head_dim, GROK2.rope_theta)
    p = 131071
    np.testing.assert_allclose(cos[p], np.cos(p * inv), atol=1e-12)
    assert np.all(np.abs(cos**2 + sin**2 - 1) < 1e-12)


def test_yarn_equals_original_on_high_frequency_dims():
    cfg = GROK2.replace(rope_type="yarn")
    yarn, mscale = yarn_inv_freq(cfg)
    orig = original_inv_freq(cfg.head_dim, cfg.rope_theta)
    assert mscale == pytest.approx(0.1 * np.log(16.0) + 1.0)
    fast = slice(0, 10)  # dims that turn more than beta_fast times over the original context
    np.testing.assert_allclose(yarn[fast], orig[fast], rtol=1e-12)
    np.testing.assert_allclose(yarn[-5:], orig[-5:] / cfg.scaling_factor, rtol=1e-12)
    y_cos, _ = rope_table_np(cfg, 64)
    o_cos, _ = rope_table_np(GROK2, 64)
    np.testing.assert_allclose(y_cos[:, fast] / mscale, o_cos[:, fast], atol=1e-12)


def test_logits_at_one_position_equal_the_full_logits_there(tmp_path, hf_tensors):
    path = write_checkpoint(tmp_path / "c", TINY_GROK2, hf_tensors(TINY_GROK2))
    model = grok.load_pretrained(path, dtype=jnp.float32)
    tokens = jnp.asarray(np.arange(20).reshape(2, 10) + 3, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(10, dtype=jnp.int32), (2, 10))
    lengths = jnp.array([10, 10], jnp.int32)
    full, _ = model.apply(tokens, positions, None, lengths)
    picked, _ = model.apply(tokens, positions, None, lengths, jnp.array([3, 9], jnp.int32))
    assert picked.shape == (2, 1, TINY_GROK2.vocab_size)
    np.testing.assert_allclose(picked[:, 0], full[jnp.arange(2), jnp.array([3, 9])], atol=1e-5)
