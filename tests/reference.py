"""An independent float64 numpy reference of the Grok-2 / Grok-1 forward pass: the test oracle.

Written from ``docs/spec.md`` sections 1-3 only, never from the library's model
code, so that the library can be checked against it. Readability comes before speed: plain
loops where they are clearer, everything in float64, no batching tricks.

Weights are given the way the release names and stores them (spec section 4): Hugging Face
names, PyTorch ``[out, in]`` matrices, full (already stitched) expert tensors.

Shape letters: B batch, T query positions, S key positions, D model width, N query heads,
K kv heads, G = N/K, H head dim, F dense MLP width, Fe expert width, E experts,
k experts per token, V vocab, L layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from grok.config import GrokConfig
from grok.errors import CheckpointError, GenerationError, TokenizerError

# Standard deviations of the random weights, as multiples of 1/sqrt(fan_in). Chosen so that,
# on the TINY presets, every soft cap, the attention temperature and the router change the
# logits visibly (see random_tensors).
_QK_GAIN = 2.0  # attention logits of std ~ 4 * H**-0.5 * sqrt(H) = 2: the cap 1.5 bites
_ROUTER_GAIN = 1.5  # router logits of std ~ 1.5: the cap 0.8 bites, the top-k is clear
_HEAD_GAIN = 4.0  # untied head: logits of std ~ 4 * output_multiplier_scale = 2 on cap 2
_NORM_NOISE = 0.1  # RMSNorm weights 1 + N(0, 0.1^2)


# Naming and shapes.


def layer_prefix(layer: int) -> str:
    """``model.layers.{layer}.``: the prefix of every tensor of one layer."""
    return f"model.layers.{layer}."


def expected_tensor_shapes(config: GrokConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the forward pass reads, by released name, with its full PyTorch shape.

    ``lm_head.weight`` is absent when ``config.tie_word_embeddings``; the dense MLP tensors
    are present only when ``config.residual_moe``.
    """
    V, D = config.vocab_size, config.hidden_size
    N, K, H = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    F, Fe, E = config.intermediate_size, config.moe_intermediate_size, config.num_local_experts
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (V, D),
        "model.norm.weight": (D,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    for i in range(config.num_hidden_layers):
        p = layer_prefix(i)
        shapes[p + "self_attn.q_proj.weight"] = (N * H, D)
        shapes[p + "self_attn.k_proj.weight"] = (K * H, D)
        shapes[p + "self_attn.v_proj.weight"] = (K * H, D)
        shapes[p + "self_attn.o_proj.weight"] = (D, N * H)
        for norm in ("pre_attn", "post_attn", "pre_moe", "post_moe"):
            shapes[p + f"{norm}_norm.weight"] = (D,)
        if config.residual_moe:
            shapes[p + "mlp.gate_proj.weight"] = (F, D)
            shapes[p + "mlp.up_proj.weight"] = (F, D)
            shapes[p + "mlp.down_proj.weight"] = (D, F)
        shapes[p + "block_sparse_moe.gate.weight"] = (E, D)
        for e in range(E):
            q = p + f"block_sparse_moe.experts.{e}."
            shapes[q + "w1.weight"] = (Fe, D)
            shapes[q + "w3.weight"] = (Fe, D)
            shapes[q + "w2.weight"] = (D, Fe)
    return shapes


def check_tensors(config: GrokConfig, tensors: Mapping[str, np.ndarray]) -> None:
    """Raises CheckpointError unless ``tensors`` holds exactly the expected names and shapes."""
    expected = expected_tensor_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(
            f"reference weights: {len(missing)} tensor(s) missing, first {missing[:3]}"
        )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"reference weights: {len(unexpected)} unexpected tensor(s), first {unexpected[:3]}"
            + (" (the head is tied to the embedding)" if "lm_head.weight" in unexpected else "")
        )
    for name, shape in expected.items():
        found = tuple(np.shape(tensors[name]))
        if found != shape:
            raise CheckpointError(
                f"reference weights: tensor {name!r} has shape {found}, expected {shape}"
            )


# Random weights.


def random_tensors(config: GrokConfig, seed: int, *, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Random float64 weights under the released names, sized so every knob bites.

    Projections are N(0, (gain * scale)^2 / fan_in) with gain 1, except the q/k projections,
    the router and the untied head (module constants above); RMSNorm weights are near 1;
    the embedding has std 1/sqrt(D) so that ``embed * embedding_multiplier_scale`` has rms
    about 1 when the multiplier is sqrt(D). ``scale`` multiplies every projection's std.
    """
    rng = np.random.default_rng(seed)
    D = config.hidden_size
    out: dict[str, np.ndarray] = {}
    for name, shape in expected_tensor_shapes(config).items():
        if len(shape) == 1:  # an RMSNorm weight
            out[name] = 1.0 + _NORM_NOISE * rng.standard_normal(shape)
            continue
        if name == "model.embed_tokens.weight":
            std = 1.0 / math.sqrt(D)
        else:
            fan_in = shape[1]
            gain = 1.0
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                gain = _QK_GAIN
            elif name.endswith("block_sparse_moe.gate.weight"):
                gain = _ROUTER_GAIN
            elif name == "lm_head.weight":
                gain = _HEAD_GAIN
            std = gain * scale / math.sqrt(fan_in)
        out[name] = std * rng.standard_normal(shape)
    return out


# Small pure functions.


def rel_err(got, want) -> float:
    """max |got - want| / max |want|, in float64: how the tests compare a result with the
    reference (or with another implementation)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def soft_cap(x: np.ndarray, cap: float | None) -> np.ndarray:
    """cap * tanh(x / cap); ``None`` means off (x unchanged)."""
    if cap is None:
        return x
    return cap * np.tanh(x / cap)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis; the weight used as is."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x: np.ndarray, hidden_act: str) -> np.ndarray:
    """``"gelu"``: x * Phi(x) with the exact erf; ``"gelu_tanh"``: the tanh approximation."""
    if hidden_act == "gelu":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if hidden_act == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    raise ValueError(f"unknown hidden_act {hidden_act!r}")


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax along ``axis``; entries equal to -inf get probability exactly 0."""
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def attention_temperature(config: GrokConfig, positions: np.ndarray) -> np.ndarray:
    """tau(p) = log2(p) / log2(attn_temperature_len) for p > len, else 1 (all 1 when off)."""
    p = np.asarray(positions, dtype=np.float64)
    length = config.attn_temperature_len
    if length is None:
        return np.ones_like(p)
    # np.maximum only keeps log2 away from 0; those entries are replaced by 1 anyway.
    tau = np.log2(np.maximum(p, 1.0)) / math.log2(length)
    return np.where(p > length, tau, 1.0)


# Rotary embedding.


def _base_inverse_frequencies(config: GrokConfig) -> np.ndarray:
    """theta^(-2i/H) for i < H/2: the plain RoPE frequencies, [H/2]."""
    H = config.head_dim
    i = np.arange(H // 2, dtype=np.float64)
    return config.rope_theta ** (-2.0 * i / H)


def yarn_correction_range(config: GrokConfig) -> tuple[float, float]:
    """(low, high): the pair indices between which YaRN ramps from original to interpolated.

    The pair index i whose wavelength 2*pi*theta^(2i/H) fits r times into
    original_max_position_embeddings is i(r) = H * ln(L0 / (2*pi*r)) / (2 * ln theta);
    low = floor(i(beta_fast)), high = ceil(i(beta_slow)), both clamped to [0, H-1]
    (the YaRN paper's convention).
    """
    H = config.head_dim
    L0 = config.original_max_position_embeddings

    def pair_index(rotations: float) -> float:
        return H * math.log(L0 / (2.0 * math.pi * rotations)) / (2.0 * math.log(config.rope_theta))

    low = math.floor(pair_index(config.beta_fast))
    high = math.ceil(pair_index(config.beta_slow))
    return float(max(low, 0)), float(min(high, H - 1))


def yarn_ramp(config: GrokConfig) -> np.ndarray:
    """The YaRN ramp over pair indices, [H/2]: 0 below ``low`` (keep), 1 above ``high``."""
    low, high = yarn_correction_range(config)
    if high == low:
        high += 0.001  # as in YaRN: avoid a zero-width ramp
    i = np.arange(config.head_dim // 2, dtype=np.float64)
    return np.clip((i - low) / (high - low), 0.0, 1.0)


def reference_inverse_frequencies(config: GrokConfig) -> np.ndarray:
    """The rotary frequencies of ``config.rope_type``, [H/2], float64.

    "original": theta^(-2i/H). "yarn": a blend of the original (extrapolated) frequency and
    the interpolated one (original / scaling_factor): extrapolated weight
    (1 - ramp) * extrapolation_factor, interpolated weight the rest.
    """
    base = _base_inverse_frequencies(config)
    if config.rope_type == "original":
        return base
    interpolated = base / config.scaling_factor
    keep = (1.0 - yarn_ramp(config)) * config.extrapolation_factor
    return interpolated * (1.0 - keep) + base * keep


def rope_mscale(config: GrokConfig) -> float:
    """The factor on cos and sin: 1 for "original"; for "yarn"
    (0.1 * ln(scaling_factor) + 1) * attn_factor, with the first factor 1 when
    scaling_factor <= 1 (as in YaRN)."""
    if config.rope_type == "original":
        return 1.0
    s = config.scaling_factor
    base = 1.0 if s <= 1.0 else 0.1 * math.log(s) + 1.0
    return base * config.attn_factor


def reference_rope_angles(config: GrokConfig, positions: np.ndarray) -> np.ndarray:
    """Rotation angles p * inv_freq_i, [..., H/2] for ``positions`` of any shape [...]."""
    p = np.asarray(positions, dtype=np.float64)
    return p[..., None] * reference_inverse_frequencies(config)


def apply_rope(config: GrokConfig, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE over the whole head dim.

    x: [B, T, heads, H]; positions: [B, T]. With x1, x2 the two halves of the head dim,
    out = mscale * concat(x1*cos - x2*sin, x2*cos + x1*sin).
    """
    half = config.head_dim // 2
    angles = reference_rope_angles(config, positions)[:, :, None, :]  # [B, T, 1, H/2]
    cos = np.cos(angles) * rope_mscale(config)
    sin = np.sin(angles) * rope_mscale(config)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# Blocks of one layer.


def reference_attention(
    config: GrokConfig,
    tensors: Mapping[str, np.ndarray],
    layer: int,
    x: np.ndarray,
    positions: np.ndarray,
) -> np.ndarray:
    """Causal GQA self-attention of one layer on normed input x: [B, T, D] -> [B, T, D].

    Query t sees keys s <= t (by index in the row); ``positions`` [B, T] give RoPE angles
    and the temperature. Query head n reads kv head n // G.
    """
    p = layer_prefix(layer) + "self_attn."
    B, T, _ = x.shape
    N, K, H = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    G = config.q_per_kv
    q = (x @ tensors[p + "q_proj.weight"].T).reshape(B, T, N, H)  # [B, T, N, H]
    k = (x @ tensors[p + "k_proj.weight"].T).reshape(B, T, K, H)  # [B, S, K, H]
    v = (x @ tensors[p + "v_proj.weight"].T).reshape(B, T, K, H)  # [B, S, K, H]
    q = apply_rope(config, q, positions)
    k = apply_rope(config, k, positions)

    tau = attention_temperature(config, positions)  # [B, T]
    causal = np.tril(np.ones((T, T), dtype=bool))  # [T, S]
    out = np.zeros((B, T, N, H))
    for n in range(N):
        kv = n // G
        s = np.einsum("bth,bsh->bts", q[:, :, n], k[:, :, kv]) * config.attn_scale  # [B, T, S]
        s = soft_cap(s, config.attn_logit_softcapping)
        s = s * tau[:, :, None]
        s = np.where(causal[None], s, -np.inf)
        probs = softmax(s, axis=-1)  # [B, T, S]
        out[:, :, n] = np.einsum("bts,bsh->bth", probs, v[:, :, kv])
    return out.reshape(B, T, N * H) @ tensors[p + "o_proj.weight"].T  # [B, T, D]


def reference_cached_attention(
    config: GrokConfig,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    positions: np.ndarray,
    lengths: np.ndarray,
) -> np.ndarray:
    """The attention core over a KV cache, from section 2.1 and 2.3: q [B, T, K, G, H] (RoPE
    applied) against keys and values [B, S, K, H], key s at position s; query (b, t) at
    positions[b, t] sees keys s <= that position with s < lengths[b] (each query must see
    one at least). Logits q.k * attn_scale, capped, times tau(p); softmax; times v.
    Returns [B, T, K, G, H]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, K, G, H = q.shape
    tau = attention_temperature(config, positions)  # [B, T]
    out = np.zeros((B, T, K, G, H))
    for b in range(B):
        for t in range(T):
            keys = np.arange(k.shape[1])
            visible = (keys <= positions[b, t]) & (keys < lengths[b])  # [S]
            assert visible.any(), "every query must see a key"
            for kv in range(K):
                s = q[b, t, kv] @ k[b, :, kv].T * config.attn_scale  # [G, S]
                s = soft_cap(s, config.attn_logit_softcapping) * tau[b, t]
                probs = softmax(np.where(visible[None], s, -np.inf), axis=-1)  # [G, S]
                out[b, t, kv] = probs @ v[b, :, kv]  # [G, H]
    return out


def reference_paged_attention(
    config: GrokConfig,
    q: np.ndarray,
    k_pool: np.ndarray,
    v_pool: np.ndarray,
    pages: np.ndarray,
    positions: np.ndarray,
    lengths: np.ndarray,
) -> np.ndarray:
    """``reference_cached_attention`` over a paged KV cache: pools k, v [M, Z, K, H] and page
    tables pages [B, W], key s of row b at ``pool[pages[b, s // Z], s % Z]``; each row's pages
    gathered into [B, W * Z, K, H] first (entries past a row's length, which may name no page,
    are clipped: those keys are masked). Returns [B, T, K, G, H]."""
    pages = np.clip(np.asarray(pages), 0, k_pool.shape[0] - 1)
    b, w = pages.shape
    _, z, kv, h = k_pool.shape
    k, v = (np.asarray(pool)[pages].reshape(b, w * z, kv, h) for pool in (k_pool, v_pool))
    return reference_cached_attention(config, q, k, v, positions, lengths)


def reference_dense_mlp(
    config: GrokConfig, tensors: Mapping[str, np.ndarray], layer: int, x: np.ndarray
) -> np.ndarray:
    """down(gelu(gate x) * (up x)): [..., D] -> [..., D]."""
    p = layer_prefix(layer) + "mlp."
    gate = x @ tensors[p + "gate_proj.weight"].T  # [..., F]
    up = x @ tensors[p + "up_proj.weight"].T  # [..., F]
    return (gelu(gate, config.hidden_act) * up) @ tensors[p + "down_proj.weight"].T


def reference_expert(
    config: GrokConfig, tensors: Mapping[str, np.ndarray], layer: int, expert: int, x: np.ndarray
) -> np.ndarray:
    """W2(gelu(W1 x) * (W3 x)) of one expert: [..., D] -> [..., D]."""
    p = layer_prefix(layer) + f"block_sparse_moe.experts.{expert}."
    h = gelu(x @ tensors[p + "w1.weight"].T, config.hidden_act) * (x @ tensors[p + "w3.weight"].T)
    return h @ tensors[p + "w2.weight"].T  # [..., Fe] -> [..., D]


def reference_router(
    config: GrokConfig, gate_weight: np.ndarray, x: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Routing of tokens x: [M, D] with a gate [E, D].

    Returns (probs [M, E], experts [M, k], weights [M, k]): softmax of the capped router
    logits over all E, the k most probable experts (ties to the lower index) and their
    probabilities, renormalised to sum 1 only when ``config.moe_router_renormalize``.
    """
    logits = soft_cap(x @ gate_weight.T, config.router_logit_softcapping)  # [M, E]
    probs = softmax(logits, axis=-1)
    k = config.num_experts_per_tok
    experts = np.zeros((x.shape[0], k), dtype=np.int64)
    weights = np.zeros((x.shape[0], k))
    for m in range(x.shape[0]):
        # A stable sort of -P keeps equal probabilities in index order: ties go low.
        order = np.argsort(-probs[m], kind="stable")[:k]
        experts[m] = order
        weights[m] = probs[m, order]
        if config.moe_router_renormalize:
            weights[m] /= weights[m].sum()
    return probs, experts, weights


def reference_moe(
    config: GrokConfig, tensors: Mapping[str, np.ndarray], layer: int, x: np.ndarray
) -> np.ndarray:
    """Sum over the k chosen experts of weight * Expert(x), token by token: [B, T, D]."""
    B, T, D = x.shape
    flat = x.reshape(B * T, D)  # [M, D]
    gate = tensors[layer_prefix(layer) + "block_sparse_moe.gate.weight"]
    _, experts, weights = reference_router(config, gate, flat)
    out = np.zeros_like(flat)
    for m in range(B * T):
        for e, w in zip(experts[m], weights[m], strict=True):
            out[m] += w * reference_expert(config, tensors, layer, int(e), flat[m])
    return out.reshape(B, T, D)


# The whole model.


def reference_logits_with_positions(
    config: GrokConfig,
    tensors: Mapping[str, np.ndarray],
    tokens: np.ndarray,
    positions: np.ndarray,
) -> np.ndarray:
    """Logits [B, T, V] float64 of tokens [B, T] at the given absolute positions [B, T].

    The causal mask is by index within each row (token t sees tokens 0..t of its row);
    ``positions`` set only the RoPE angles and the attention temperature, so a row may
    stand for a window that starts later in a sequence.
    """
    check_tensors(config, tensors)
    tokens = np.asarray(tokens)
    positions = np.asarray(positions)
    if tokens.ndim != 2:
        raise GenerationError(f"reference: tokens must be [B, T], got shape {tokens.shape}")
    if positions.shape != tokens.shape:
        raise GenerationError(
            f"reference: positions shape {positions.shape} must equal tokens shape {tokens.shape}"
        )
    if not np.issubdtype(tokens.dtype, np.integer):
        raise TokenizerError(f"reference: token ids must be integers, got dtype {tokens.dtype}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= config.vocab_size):
        raise TokenizerError(
            f"reference: token ids must lie in [0, {config.vocab_size}), "
            f"found range [{tokens.min()}, {tokens.max()}]"
        )
    if positions.size and positions.min() < 0:
        raise GenerationError(f"reference: positions must be >= 0, found {positions.min()}")

    w = {name: np.asarray(t, dtype=np.float64) for name, t in tensors.items()}
    eps = config.rms_norm_eps
    embed = w["model.embed_tokens.weight"]  # [V, D]
    h = embed[tokens] * config.embedding_multiplier_scale  # [B, T, D]
    for i in range(config.num_hidden_layers):
        p = layer_prefix(i)
        a = reference_attention(
            config, w, i, rms_norm(h, w[p + "pre_attn_norm.weight"], eps), positions
        )
        h = h + rms_norm(a, w[p + "post_attn_norm.weight"], eps)
        x = rms_norm(h, w[p + "pre_moe_norm.weight"], eps)
        f = reference_moe(config, w, i, x)  # [B, T, D]
        if config.residual_moe:
            f = (reference_dense_mlp(config, w, i, x) + f) / math.sqrt(2.0)
        h = h + rms_norm(f, w[p + "post_moe_norm.weight"], eps)
    out = rms_norm(h, w["model.norm.weight"], eps)  # [B, T, D]
    head = embed if config.tie_word_embeddings else w["lm_head.weight"]  # [V, D]
    logits = out @ (head * config.output_multiplier_scale).T  # [B, T, V]
    return soft_cap(logits, config.final_logit_softcapping)


def reference_logits(
    config: GrokConfig, tensors: Mapping[str, np.ndarray], tokens: np.ndarray
) -> np.ndarray:
    """Logits [B, T, V] float64 of tokens [B, T] at positions 0..T-1 in every row."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise GenerationError(f"reference: tokens must be [B, T], got shape {tokens.shape}")
    B, T = tokens.shape
    positions = np.broadcast_to(np.arange(T), (B, T))
    return reference_logits_with_positions(config, tensors, tokens, positions)
