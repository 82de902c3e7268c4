"""Sanity tests of the float64 reference itself (tests/reference.py), without the library.

If the oracle is wrong every comparison against it is worthless, so these tests check its
properties from first principles: causality, the caps, that each knob of the tiny presets
changes the logits, GQA against plain multi-head attention written separately here, RoPE
and YaRN, routing, and the tied Grok-1 head.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from reference import (
    apply_rope,
    expected_tensor_shapes,
    gelu,
    random_tensors,
    reference_attention,
    reference_inverse_frequencies,
    reference_logits,
    reference_logits_with_positions,
    reference_rope_angles,
    reference_router,
    rms_norm,
    rope_mscale,
    yarn_correction_range,
)

from grok.config import GrokConfig
from grok.errors import CheckpointError, TokenizerError
from grok.presets import TINY_GROK1, TINY_GROK2

T_LONG = 10  # > TINY_GROK2.attn_temperature_len (4), so the temperature acts
EXACT = dict(rtol=0.0, atol=1e-12)  # float64 results that must not depend on what changed


def _tokens(config: GrokConfig, seed: int, B: int = 2, T: int = T_LONG) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.vocab_size, size=(B, T))


@pytest.fixture(scope="module")
def grok2_case() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """TINY_GROK2 weights, tokens [2, 10] and their logits."""
    tensors = random_tensors(TINY_GROK2, seed=0)
    tokens = _tokens(TINY_GROK2, seed=1)
    return tensors, tokens, reference_logits(TINY_GROK2, tensors, tokens)


def test_shapes_and_finiteness(grok2_case):
    tensors, tokens, logits = grok2_case
    assert logits.shape == (2, T_LONG, TINY_GROK2.vocab_size)
    assert logits.dtype == np.float64
    assert np.all(np.isfinite(logits))
    # Different tokens give different distributions (the model is not degenerate).
    assert np.std(logits[0, 0] - logits[0, 1]) > 0.1


def test_causality(grok2_case):
    tensors, tokens, logits = grok2_case
    changed = tokens.copy()
    t = 6
    changed[0, t] = (changed[0, t] + 1) % TINY_GROK2.vocab_size
    new = reference_logits(TINY_GROK2, tensors, changed)
    np.testing.assert_allclose(new[0, :t], logits[0, :t], **EXACT)
    np.testing.assert_allclose(new[1], logits[1], **EXACT)  # rows are independent
    assert np.all(np.max(np.abs(new[0, t:] - logits[0, t:]), axis=-1) > 1e-4)


def test_final_cap_bounds_and_bites(grok2_case):
    _, _, logits = grok2_case
    cap = TINY_GROK2.final_logit_softcapping
    assert np.max(np.abs(logits)) < cap
    assert np.max(np.abs(logits)) > 0.9 * cap  # the random head saturates the cap


@pytest.mark.parametrize(
    "field", ["attn_logit_softcapping", "router_logit_softcapping", "final_logit_softcapping"]
)
def test_each_cap_changes_the_logits(grok2_case, field):
    tensors, tokens, logits = grok2_case
    off = reference_logits(TINY_GROK2.replace(**{field: None}), tensors, tokens)
    assert np.max(np.abs(off - logits)) > 1e-2
    if field == "final_logit_softcapping":
        assert np.max(np.abs(off)) > TINY_GROK2.final_logit_softcapping
        np.testing.assert_allclose(np.tanh(off / 2.0) * 2.0, logits, rtol=0, atol=1e-12)


def test_temperature_acts_only_after_its_length(grok2_case):
    tensors, tokens, logits = grok2_case
    length = TINY_GROK2.attn_temperature_len
    off = reference_logits(TINY_GROK2.replace(attn_temperature_len=None), tensors, tokens)
    # tau(p) = 1 for p <= len, and position p only sees positions <= p.
    np.testing.assert_allclose(off[:, : length + 1], logits[:, : length + 1], **EXACT)
    assert np.all(np.max(np.abs(off[:, length + 1 :] - logits[:, length + 1 :]), axis=-1) > 1e-4)


def test_attention_scale_override_is_used(grok2_case):
    tensors, tokens, logits = grok2_case
    same = TINY_GROK2.replace(attn_output_multiplier=TINY_GROK2.head_dim**-0.5)
    np.testing.assert_allclose(reference_logits(same, tensors, tokens), logits, **EXACT)
    other = TINY_GROK2.replace(attn_output_multiplier=0.1)
    assert np.max(np.abs(reference_logits(other, tensors, tokens) - logits)) > 1e-2


def test_rms_norm_uses_the_weight_as_is():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    weight = np.array([1.0, 2.0])
    eps = 1e-5
    out = rms_norm(x, weight, eps)
    np.testing.assert_allclose(out[0], [3.0, 8.0] / np.sqrt(12.5 + eps), rtol=1e-15)
    np.testing.assert_array_equal(out[1], [0.0, 0.0])


def test_hidden_act_switch():
    x = np.array([-3.0, -1.0, 0.0, 1.0, 2.5])
    exact = gelu(x, "gelu")
    # x * Phi(x) with Phi the standard normal cdf.
    expected = x * 0.5 * (1.0 + np.array([math.erf(v / math.sqrt(2.0)) for v in x]))
    np.testing.assert_allclose(exact, expected, rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(gelu(np.array([1.0]), "gelu"), [0.8413447460685429], rtol=1e-15)
    approx = gelu(x, "gelu_tanh")
    assert 0 < np.max(np.abs(approx - exact)) < 1e-3


def test_hidden_act_changes_the_logits(grok2_case):
    tensors, tokens, logits = grok2_case
    tanh_logits = reference_logits(TINY_GROK2.replace(hidden_act="gelu_tanh"), tensors, tokens)
    difference = np.max(np.abs(tanh_logits - logits))
    assert 0 < difference < 0.1


def test_positions_default_and_relative_rope(grok2_case):
    tensors, tokens, logits = grok2_case
    B, T = tokens.shape
    positions = np.broadcast_to(np.arange(T), (B, T))
    same = reference_logits_with_positions(TINY_GROK2, tensors, tokens, positions)
    np.testing.assert_array_equal(same, logits)
    # Without the temperature only position differences matter to RoPE attention.
    no_temp = TINY_GROK2.replace(attn_temperature_len=None)
    base = reference_logits_with_positions(no_temp, tensors, tokens, positions)
    shifted = reference_logits_with_positions(no_temp, tensors, tokens, positions + 37)
    np.testing.assert_allclose(shifted, base, rtol=0, atol=1e-9)
    # With the temperature the absolute position matters beyond its length.
    far = reference_logits_with_positions(TINY_GROK2, tensors, tokens, positions + 37)
    assert np.max(np.abs(far - logits)) > 1e-3


# GQA against plain multi-head attention.


def _plain_mha(config: GrokConfig, w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Multi-head attention of layer 0 for K == N, one query at a time, RoPE by complex numbers.

    Pair i of a head is the complex number x[i] + 1j * x[i + H/2]; RoPE multiplies it by
    exp(1j * p * theta^(-2i/H)).
    """
    B, T, D = x.shape
    N, H = config.num_attention_heads, config.head_dim
    half = H // 2
    freqs = config.rope_theta ** (-np.arange(half) * 2.0 / H)
    q_w = w["model.layers.0.self_attn.q_proj.weight"]
    k_w = w["model.layers.0.self_attn.k_proj.weight"]
    v_w = w["model.layers.0.self_attn.v_proj.weight"]

    def rotate(vec: np.ndarray, p: int) -> np.ndarray:
        z = (vec[:half] + 1j * vec[half:]) * np.exp(1j * p * freqs)
        return np.concatenate([z.real, z.imag])

    heads = np.zeros((B, T, N * H))
    for b in range(B):
        for n in range(N):
            rows = slice(n * H, (n + 1) * H)
            keys = [rotate(k_w[rows] @ x[b, s], s) for s in range(T)]
            values = [v_w[rows] @ x[b, s] for s in range(T)]
            for t in range(T):
                query = rotate(q_w[rows] @ x[b, t], t)
                scores = np.array([query @ keys[s] for s in range(t + 1)]) / math.sqrt(H)
                cap = config.attn_logit_softcapping
                scores = cap * np.tanh(scores / cap)
                length = config.attn_temperature_len
                if t > length:
                    scores = scores * math.log2(t) / math.log2(length)
                probs = np.exp(scores - scores.max())
                probs /= probs.sum()
                heads[b, t, rows] = sum(probs[s] * values[s] for s in range(t + 1))
    return heads @ w["model.layers.0.self_attn.o_proj.weight"].T


def test_gqa_with_k_equal_n_is_plain_mha():
    config = TINY_GROK2.replace(num_key_value_heads=TINY_GROK2.num_attention_heads)
    w = random_tensors(config, seed=3)
    x = np.random.default_rng(4).standard_normal((2, 8, config.hidden_size))
    positions = np.broadcast_to(np.arange(8), (2, 8))
    ours = reference_attention(config, w, 0, x, positions)
    np.testing.assert_allclose(ours, _plain_mha(config, w, x), rtol=1e-10, atol=1e-12)


def test_gqa_equals_mha_with_repeated_kv_heads(grok2_case):
    """Query head n reads kv head n // G: copying each kv head G times gives plain MHA."""
    tensors, tokens, logits = grok2_case
    N, K, H = (TINY_GROK2.num_attention_heads, TINY_GROK2.num_key_value_heads, TINY_GROK2.head_dim)
    G, D = N // K, TINY_GROK2.hidden_size
    mha = TINY_GROK2.replace(num_key_value_heads=N)
    repeated = dict(tensors)
    for i in range(TINY_GROK2.num_hidden_layers):
        for name in ("k_proj", "v_proj"):
            key = f"model.layers.{i}.self_attn.{name}.weight"
            per_head = tensors[key].reshape(K, H, D)
            repeated[key] = np.repeat(per_head, G, axis=0).reshape(N * H, D)
    np.testing.assert_allclose(reference_logits(mha, repeated, tokens), logits, rtol=0, atol=1e-11)


# RoPE and YaRN.


def test_original_rope_angles():
    positions = np.array([[0, 1, 5, 127]])
    angles = reference_rope_angles(TINY_GROK2, positions)
    H, theta = TINY_GROK2.head_dim, TINY_GROK2.rope_theta
    assert angles.shape == (1, 4, H // 2)
    np.testing.assert_array_equal(angles[0, :, 0], [0, 1, 5, 127])  # i = 0: frequency 1
    np.testing.assert_allclose(angles[0, 3, 5], 127 * theta ** (-10 / H), rtol=1e-15)
    assert rope_mscale(TINY_GROK2) == 1.0


def test_rope_preserves_norms_and_rotates_half_pairs():
    config = TINY_GROK2
    H = config.head_dim
    x = np.zeros((1, 1, 1, H))
    x[..., 0] = 1.0  # pair 0: (x[0], x[H/2]) = (1, 0)
    out = apply_rope(config, x, np.array([[2]]))
    expected = np.zeros(H)
    expected[0], expected[H // 2] = math.cos(2.0), math.sin(2.0)
    np.testing.assert_allclose(out[0, 0, 0], expected, atol=1e-15)
    y = np.random.default_rng(5).standard_normal((2, 3, 4, H))
    rotated = apply_rope(config, y, np.array([[0, 9, 100], [3, 4, 5]]))
    np.testing.assert_allclose(np.linalg.norm(rotated, axis=-1), np.linalg.norm(y, axis=-1))


# original_max_position_embeddings 4096 with H 16, theta 1e4, beta 8 / 1 puts the ramp at
# pair indices 3..6: i(8) = 16 ln(4096 / 16 pi) / (2 ln 1e4) = 3.82, i(1) = 5.63.
YARN = TINY_GROK2.replace(rope_type="yarn", original_max_position_embeddings=4096)


def test_yarn_correction_range_by_hand():
    assert yarn_correction_range(YARN) == (3.0, 6.0)
    assert rope_mscale(YARN) == pytest.approx(0.1 * math.log(8.0) + 1.0)
    assert rope_mscale(YARN.replace(attn_factor=2.0)) == pytest.approx(2 * rope_mscale(YARN))


def test_yarn_frequencies_blend_between_original_and_interpolated():
    original = reference_inverse_frequencies(TINY_GROK2)
    yarn = reference_inverse_frequencies(YARN)
    s = YARN.scaling_factor
    np.testing.assert_array_equal(yarn[:4], original[:4])  # ramp 0: kept
    np.testing.assert_allclose(yarn[6:], original[6:] / s, rtol=1e-15)  # ramp 1: interpolated
    ramp = np.array([1 / 3, 2 / 3])  # pairs 4, 5 on the ramp (i - 3) / 3
    np.testing.assert_allclose(yarn[4:6], original[4:6] * ((1 - ramp) + ramp / s), rtol=1e-14)
    # extrapolation_factor 0 interpolates every frequency.
    none_kept = reference_inverse_frequencies(YARN.replace(extrapolation_factor=0.0))
    np.testing.assert_allclose(none_kept, original / s, rtol=1e-15)


def test_yarn_equals_original_on_high_frequency_dims_at_short_positions():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 16, 2, YARN.head_dim))
    positions = np.arange(16)[None]
    plain = apply_rope(TINY_GROK2, x, positions)
    yarn = apply_rope(YARN, x, positions) / rope_mscale(YARN)
    H2 = YARN.head_dim // 2
    kept = np.r_[0:4, H2 : H2 + 4]  # pairs 0..3, both halves
    np.testing.assert_allclose(yarn[..., kept], plain[..., kept], rtol=1e-13, atol=1e-13)
    assert np.max(np.abs(yarn - plain)) > 1e-3  # the low frequencies are interpolated
    # With scaling_factor 1 YaRN is plain RoPE (mscale 1, nothing to interpolate).
    unit = YARN.replace(scaling_factor=1.0)
    np.testing.assert_allclose(apply_rope(unit, x, positions), plain, rtol=0, atol=1e-15)


def test_yarn_changes_the_logits(grok2_case):
    tensors, tokens, logits = grok2_case
    assert np.max(np.abs(reference_logits(YARN, tensors, tokens) - logits)) > 1e-3


# Router and experts.


def test_router_top_k_ties_go_to_the_lower_index():
    config = TINY_GROK2.replace(router_logit_softcapping=None)
    E, D = config.num_local_experts, config.hidden_size
    x = np.random.default_rng(7).standard_normal((3, D))
    gate = np.zeros((E, D))
    probs, experts, weights = reference_router(config, gate, x)
    np.testing.assert_allclose(probs, 1.0 / E)
    np.testing.assert_array_equal(experts, [[0, 1]] * 3)
    # Experts 5 and 2 share the best row: chosen in index order 2, 5.
    gate[2] = gate[5] = x[0]
    _, experts, weights = reference_router(config, gate, x[:1])
    np.testing.assert_array_equal(experts, [[2, 5]])
    assert weights[0, 0] == weights[0, 1]


def test_router_weights_are_probabilities_not_renormalised():
    config = TINY_GROK2
    rng = np.random.default_rng(8)
    gate = rng.standard_normal((config.num_local_experts, config.hidden_size))
    x = rng.standard_normal((5, config.hidden_size))
    probs, experts, weights = reference_router(config, gate, x)
    logits = x @ gate.T
    capped = config.router_logit_softcapping * np.tanh(logits / config.router_logit_softcapping)
    expected = np.exp(capped) / np.exp(capped).sum(-1, keepdims=True)
    np.testing.assert_allclose(probs, expected, rtol=1e-14)
    np.testing.assert_array_equal(experts, np.argsort(-expected, axis=-1)[:, :2])
    np.testing.assert_allclose(weights, np.take_along_axis(expected, experts, -1), rtol=1e-14)
    assert np.all(weights.sum(-1) < 1.0 - 1e-3)
    _, _, renormed = reference_router(config.replace(moe_router_renormalize=True), gate, x)
    np.testing.assert_allclose(renormed.sum(-1), 1.0, rtol=1e-15)


def test_router_renormalize_changes_the_logits(grok2_case):
    tensors, tokens, logits = grok2_case
    renormed = reference_logits(TINY_GROK2.replace(moe_router_renormalize=True), tensors, tokens)
    assert np.max(np.abs(renormed - logits)) > 1e-3


def test_residual_moe_is_dense_plus_moe_over_sqrt2(grok2_case):
    """With a zero dense MLP, Grok-2's f = MoE / sqrt(2); Grok-1's f = MoE with w2 / sqrt(2)."""
    tensors, tokens, _ = grok2_case
    silent = dict(tensors)
    moe_only = {k: v for k, v in tensors.items() if ".mlp." not in k}
    for i in range(TINY_GROK2.num_hidden_layers):
        silent[f"model.layers.{i}.mlp.down_proj.weight"] = np.zeros_like(
            tensors[f"model.layers.{i}.mlp.down_proj.weight"]
        )
        for e in range(TINY_GROK2.num_local_experts):
            name = f"model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight"
            moe_only[name] = tensors[name] / math.sqrt(2.0)
    with_dense = reference_logits(TINY_GROK2, silent, tokens)
    without = reference_logits(TINY_GROK2.replace(residual_moe=False), moe_only, tokens)
    np.testing.assert_allclose(with_dense, without, rtol=0, atol=1e-12)


# Grok-1 and the weight checks.


def test_grok1_runs_with_a_tied_head():
    tensors = random_tensors(TINY_GROK1, seed=9)
    assert "lm_head.weight" not in tensors
    assert not any(".mlp." in name for name in tensors)
    tokens = _tokens(TINY_GROK1, seed=10, T=12)
    logits = reference_logits(TINY_GROK1, tensors, tokens)
    assert logits.shape == (2, 12, TINY_GROK1.vocab_size)
    assert np.all(np.isfinite(logits))
    # The tied head is the embedding: an untied config holding a copy of it agrees.
    untied = dict(tensors, **{"lm_head.weight": tensors["model.embed_tokens.weight"].copy()})
    same = reference_logits(TINY_GROK1.replace(tie_word_embeddings=False), untied, tokens)
    np.testing.assert_array_equal(same, logits)
    # Changing the embedding of a token not in the prompt changes only its logit.
    unused = next(v for v in range(TINY_GROK1.vocab_size) if v not in tokens)
    bumped = dict(tensors)
    bumped["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].copy()
    bumped["model.embed_tokens.weight"][unused] *= 2.0
    new = reference_logits(TINY_GROK1, bumped, tokens)
    np.testing.assert_allclose(new[..., unused], 2.0 * logits[..., unused], rtol=1e-12)
    others = np.arange(TINY_GROK1.vocab_size) != unused
    np.testing.assert_allclose(new[..., others], logits[..., others], **EXACT)


def test_grok1_settings_bite():
    """Grok-1 has no final cap, so its logits are not bounded; its attention cap acts."""
    tensors = random_tensors(TINY_GROK1, seed=11)
    tokens = _tokens(TINY_GROK1, seed=12)
    logits = reference_logits(TINY_GROK1, tensors, tokens)
    uncapped = reference_logits(TINY_GROK1.replace(attn_logit_softcapping=None), tensors, tokens)
    assert np.max(np.abs(uncapped - logits)) > 1e-3


def test_weight_checks_name_the_tensor(grok2_case):
    tensors, tokens, _ = grok2_case
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.pre_moe_norm.weight"}
    with pytest.raises(CheckpointError, match="pre_moe_norm"):
        reference_logits(TINY_GROK2, missing, tokens)
    bad = dict(tensors)
    bad["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64))
    with pytest.raises(CheckpointError, match=r"k_proj.*\(64, 64\).*\(32, 64\)"):
        reference_logits(TINY_GROK2, bad, tokens)
    extra = dict(random_tensors(TINY_GROK1, seed=0))
    extra["lm_head.weight"] = extra["model.embed_tokens.weight"]
    with pytest.raises(CheckpointError, match="lm_head"):
        reference_logits(TINY_GROK1, extra, tokens)
    with pytest.raises(TokenizerError, match="256"):
        reference_logits(TINY_GROK2, tensors, tokens + TINY_GROK2.vocab_size)


def test_expected_shapes_match_the_spec_table():
    shapes = expected_tensor_shapes(TINY_GROK2)
    assert shapes["model.embed_tokens.weight"] == (256, 64)
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == (64, 64)
    assert shapes["model.layers.1.self_attn.v_proj.weight"] == (32, 64)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (64, 96)
    assert shapes["model.layers.0.block_sparse_moe.gate.weight"] == (8, 64)
    assert shapes["model.layers.0.block_sparse_moe.experts.7.w2.weight"] == (64, 32)
    per_layer = 4 + 4 + 3 + 1 + 3 * 8
    assert len(shapes) == 3 + 2 * per_layer
