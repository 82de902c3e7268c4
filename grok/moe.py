"""The router, the experts and the residual MoE block.

Glossary: M tokens (B * T flattened), D model width, F dense MLP width, Fe expert width,
E experts, k experts per token, A = M * k token-expert assignments.

Only the k chosen experts do work for a token:
- few assignments (decode): each chosen expert runs once on the few tokens and the others
  are skipped, so only chosen experts' weights are read;
- many assignments (prefill): assignments are sorted by expert and cut into fixed-size
  blocks that each belong to one expert (groups padded to the block size); a scan runs one
  [block, D] x [Fe, D] matmul per block, skipping empty blocks. Work is the active
  tokens-times-experts plus at most one partial block per expert.
- many assignments on GPU and TPU: ``moe_ragged``, one grouped matmul per weight over the
  assignments sorted by expert, with no padding (``Kernels.grouped``: ``jax.lax.ragged_dot``,
  or the native kernel on one CPU device, where it also serves decode).
The kernels pick the path for "auto" (``Kernels.expert_path``; for XLA by platform,
``grok.kernels.xla.PREFILL_IMPL``, overridable with the ``GROK_MOE_PREFILL`` environment
variable), or the caller with ``moe_impl``.
``moe_dense_reference`` computes every expert and masks: the slow oracle for tests.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import haiku as hk
import jax
import jax.numpy as jnp

from grok.config import GrokConfig
from grok.kernels import REFERENCE, Kernels
from grok.kernels.xla import EXPERT_IN_AXIS  # noqa: F401  (the experts' layout, read here by tests)
from grok.layers import activation, dequant, for_product, get_weight, soft_cap

SQRT2 = math.sqrt(2.0)  # the residual MoE divides (dense + MoE) by this
EXPERTS_MODULE = "experts"  # Haiku name scope of the stacked expert weights (under "grok")


def expert_weights(config: GrokConfig, dtype: jnp.dtype, quant: str | None):
    """The stacked expert weights of every layer: w1/w3 [L, E, Fe, D], w2 [L, E, D, Fe].

    Created once, outside the layer scan, under ``grok/experts``; each is a plain array or a
    ``QuantWeight``. Initialised with standard deviation 1/sqrt(fan-in) of one expert.
    """
    c = config
    L, E, D, Fe = c.num_hidden_layers, c.num_local_experts, c.hidden_size, c.moe_intermediate_size
    init_in = hk.initializers.TruncatedNormal(D**-0.5)
    init_hidden = hk.initializers.TruncatedNormal(Fe**-0.5)
    with hk.name_scope(EXPERTS_MODULE):
        w1 = get_weight("w1", (L, E, Fe, D), dtype, init_in, quant=quant, in_dims=(3,))
        w3 = get_weight("w3", (L, E, Fe, D), dtype, init_in, quant=quant, in_dims=(3,))
        w2 = get_weight("w2", (L, E, D, Fe), dtype, init_hidden, quant=quant, in_dims=(3,))
    return w1, w3, w2


def route(
    x: jax.Array,
    w_gate: jax.Array,
    *,
    cap: float | None,
    k: int,
    renormalize: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k routing in float32.

    Args:
      x: [..., D] tokens; w_gate: [E, D] router weight.
    Returns:
      (weights [..., k] float32, experts [..., k] int32, probs [..., E] float32). The weights
      are the softmax probabilities at the chosen experts, not renormalised unless asked.
      Ties break toward the lower expert index.
    """
    logits = jnp.einsum(
        "...D,ED->...E",
        x.astype(jnp.float32),
        w_gate.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    logits = soft_cap(logits, cap)
    probs = jax.nn.softmax(logits, axis=-1)  # [..., E]
    weights, experts = jax.lax.top_k(probs, k)  # lax.top_k puts the lower index first on ties
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32), probs


def _gate(h1: jax.Array, h3: jax.Array, act: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """``act(h1) * h3`` computed in float32 and returned in ``h1``'s dtype (as the serving
    engines' fused act-and-multiply kernels do). In bfloat16 XLA:CPU ran these elementwise ops
    2-4x slower than in float32 (tanh-GELU times a [2048, 1024] matrix: 2.6 ms against 0.6)."""
    f32 = jnp.float32
    return (act(h1.astype(f32)) * h3.astype(f32)).astype(h1.dtype)


def _gated_mlp(x, w1, w3, w2, act, kernels: Kernels):
    """``w2(act(x w1) * (x w3))`` for x [..., D], w1/w3 [F, D], w2 [D, F] ([out, in])."""
    dt = x.dtype
    w1, w3, w2 = for_product(w1, dt), for_product(w3, dt), for_product(w2, dt)
    xm = x.reshape(-1, x.shape[-1])  # [M, D]
    h1 = kernels.project("MD,FD->MF", xm, w1)  # [M, F]
    h = _gate(h1, kernels.project("MD,FD->MF", xm, w3), act)  # [M, F]
    return kernels.project("MF,DF->MD", h, w2).reshape(x.shape)


def moe_gather(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    w1: jax.Array,
    w3: jax.Array,
    w2: jax.Array,
    act: Callable[[jax.Array], jax.Array],
    *,
    kernels: Kernels = REFERENCE,
) -> jax.Array:
    """Expert outputs for few tokens (decode): each expert that some token chose runs once on
    all M tokens, and a ``lax.cond`` skips the others, so only the chosen experts' weights are
    read, each once. Work is M rows per chosen expert: meant for M * k <= E. One token (batch-1
    decode) indexes its k experts directly.

    (Gathering each assignment's weights, ``w1[experts]``, would read the same bytes, but on
    CPU XLA copies the gathered [M, k, D, Fe] blocks first: measured 3-25x slower.)

    x [M, D], weights/experts [M, k], w1/w3 [E, Fe, D], w2 [E, D, Fe] -> [M, D].
    """
    if x.shape[0] == 1:  # one token: its k experts are distinct; index them, no conds
        out = jnp.zeros(x.shape, jnp.float32)  # [1, D]
        for j in range(experts.shape[1]):  # static: k is 2
            ej = experts[0, j]
            y = _gated_mlp(x, w1[ej], w3[ej], w2[ej], act, kernels).astype(jnp.float32)
            out = out + y * weights[0, j]
        return out.astype(x.dtype)
    e = w1.shape[0]
    gate = jnp.sum(jax.nn.one_hot(experts, e) * weights[..., None], axis=1)  # [M, E]
    used = jnp.any(experts[..., None] == jnp.arange(e), axis=(0, 1))  # [E]
    out = jnp.zeros(x.shape, jnp.float32)  # [M, D]
    for i in range(e):  # static: E is small (8 for Grok-1 and Grok-2)
        y = jax.lax.cond(
            used[i],
            lambda i=i: _gated_mlp(x, w1[i], w3[i], w2[i], act, kernels).astype(jnp.float32),
            lambda: jnp.zeros(x.shape, jnp.float32),
        )  # [M, D]
        out = out + y * gate[:, i, None]
    return out.astype(x.dtype)


MAX_BLOCK = 128  # see block_size_for


def block_size_for(num_assignments: int, num_experts: int) -> int:
    """Rows per expert block: about one block per expert for short prompts, at most 128.

    Each block reads (and on XLA:CPU copies) its expert's weights once, so blocks far below
    A / E re-read weights. On the CPU bench shape (D 512, Fe 1024) at A = 2048 (a 128-token
    prompt at batch 8) the prefill took 213 / 181 / 196 ms in bf16 and 278 / 233 / 259 ms in
    float32 with blocks of at most 32 / 128 / 256 rows (min of 5, load ~1.2); at A = 256 the
    block is A / E = 32 either way.
    """
    target = max(8, num_assignments // num_experts)
    return min(MAX_BLOCK, 1 << (target.bit_length() - 1))


def moe_blocks(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    w1: jax.Array,
    w3: jax.Array,
    w2: jax.Array,
    act: Callable[[jax.Array], jax.Array],
    block: int | None = None,
    *,
    kernels: Kernels = REFERENCE,
) -> jax.Array:
    """Expert outputs by sorting assignments into per-expert blocks (for large M).

    x [M, D], weights/experts [M, k], w1/w3 [E, Fe, D], w2 [E, D, Fe] -> [M, D].
    """
    m, d = x.shape
    k = experts.shape[1]
    e = w1.shape[0]
    a = m * k
    block = block or block_size_for(a, e)
    num_blocks = a // block + e  # static upper bound on blocks after per-expert padding

    flat_expert = experts.reshape(a)  # [A]
    order = jnp.argsort(flat_expert, stable=True)  # [A], assignments sorted by expert
    sorted_expert = flat_expert[order]
    group_sizes = jnp.bincount(flat_expert, length=e)  # [E]
    padded_sizes = (group_sizes + block - 1) // block * block
    padded_ends = jnp.cumsum(padded_sizes)
    padded_starts = padded_ends - padded_sizes
    group_starts = jnp.cumsum(group_sizes) - group_sizes
    rank_in_group = jnp.arange(a) - group_starts[sorted_expert]
    dest = padded_starts[sorted_expert] + rank_in_group  # [A] row in the padded buffer

    rows = num_blocks * block
    token_of = order // k  # [A] source token of each sorted assignment
    xs = jnp.zeros((rows, d), x.dtype).at[dest].set(x[token_of])  # [R, D]
    block_start = jnp.arange(num_blocks) * block
    block_expert = jnp.minimum(jnp.searchsorted(padded_ends, block_start, side="right"), e - 1)
    block_used = block_start < padded_ends[-1]

    def one_block(_, inputs):
        xb, eb, used = inputs  # [block, D], (), ()
        yb = jax.lax.cond(
            used,
            lambda: _gated_mlp(xb, w1[eb], w3[eb], w2[eb], act, kernels),
            lambda: jnp.zeros_like(xb),
        )
        return None, yb

    _, ys = jax.lax.scan(
        one_block, None, (xs.reshape(num_blocks, block, d), block_expert, block_used)
    )
    ys = ys.reshape(rows, d)[dest]  # [A, D] back in sorted-assignment order
    ws = weights.reshape(a)[order]  # [A]
    out = jnp.zeros((m, d), jnp.float32).at[token_of].add(ys.astype(jnp.float32) * ws[:, None])
    return out.astype(x.dtype)


# ``moe_ragged`` takes long prompts this many tokens at a time: its [A, D] buffers (the rows
# sorted by expert, their outputs, the float32 sum) stay bounded (about 2 GiB per device for
# Grok-2 at width 8192), and rows sorted within a pass read each expert's weights about once.
RAGGED_TOKENS = 8192


def moe_ragged(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    w1,
    w3,
    w2,
    act: Callable[[jax.Array], jax.Array],
    *,
    kernels: Kernels = REFERENCE,
) -> jax.Array:
    """Expert outputs by grouped matmuls (``Kernels.expert_mlp``: XLA's ``grouped``, or a
    kernel) over the assignments sorted by expert: work is exactly the active
    tokens-times-experts, with no padding; at most ``RAGGED_TOKENS`` tokens per pass.

    With the expert width Fe split over ``model`` the compiler keeps every device on its own
    Fe slice of w1, w3 and w2 and sums the [A, D] partial outputs once (one all-reduce); the
    weights are never gathered.

    x [M, D], weights/experts [M, k], w1/w3 [E, Fe, D], w2 [E, D, Fe] (laid out as
    ``EXPERT_IN_AXIS`` says; or ``Kernels.layer_experts`` views, or ``QuantWeight``s)
    -> [M, D].
    """
    m, d = x.shape
    if m <= RAGGED_TOKENS:
        return _moe_ragged_pass(x, weights, experts, w1, w3, w2, act, kernels)
    passes = -(-m // RAGGED_TOKENS)
    pad = passes * RAGGED_TOKENS - m  # padding tokens: weight 0 (their expert 0 adds nothing)

    def split(a: jax.Array) -> jax.Array:  # [M, ...] -> [passes, RAGGED_TOKENS, ...]
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape(passes, RAGGED_TOKENS, *a.shape[1:])

    def one_pass(chunk):
        return _moe_ragged_pass(*chunk, w1, w3, w2, act, kernels)

    out = jax.lax.map(one_pass, (split(x), split(weights), split(experts)))
    return out.reshape(passes * RAGGED_TOKENS, d)[:m]  # [M, D]


def _moe_ragged_pass(x, weights, experts, w1, w3, w2, act, kernels: Kernels) -> jax.Array:
    """``moe_ragged`` on tokens x [M, D] in one pass."""
    m, d = x.shape
    k = experts.shape[1]
    e = w1.shape[0]
    a = m * k

    flat_expert = experts.reshape(a)  # [A]
    order = jnp.argsort(flat_expert, stable=True)  # [A], assignments sorted by expert
    row_expert = flat_expert[order]  # [A]
    token_of = order // k  # [A] source token of each sorted assignment
    sizes = jnp.bincount(flat_expert, length=e).astype(jnp.int32)  # [E]
    xs = x[token_of]  # [A, D]
    gate = functools.partial(_gate, act=act)
    ys = kernels.expert_mlp(xs, w1, w3, w2, sizes, row_expert, gate)  # [A, D]
    ws = weights.reshape(a)[order]  # [A]
    out = jnp.zeros((m, d), jnp.float32).at[token_of].add(ys.astype(jnp.float32) * ws[:, None])
    return out.astype(x.dtype)


def moe_dense_reference(
    x, weights, experts, w1, w3, w2, act, *, kernels: Kernels = REFERENCE
) -> jax.Array:
    """Every expert on every token, masked: E / k times the work. A test oracle only."""
    e = w1.shape[0]
    w1, w3, w2 = (dequant(kernels.dense(w), x.dtype) for w in (w1, w3, w2))
    h = act(jnp.einsum("MD,EFD->MEF", x, w1)) * jnp.einsum("MD,EFD->MEF", x, w3)
    y = jnp.einsum("MEF,EDF->MED", h, w2).astype(jnp.float32)  # [M, E, D]
    gate = jnp.sum(jax.nn.one_hot(experts, e) * weights[..., None], axis=1)  # [M, E]
    return jnp.einsum("MED,ME->MD", y, gate).astype(x.dtype)


class MoE(hk.Module):
    """Router and experts. Parameter: router [E, D] (float32).

    The expert weights come in from ``expert_weights``, one layer's through
    ``Kernels.layer_experts`` (or, for a standalone module, as [E, ...] arrays).
    """

    def __init__(
        self,
        config: GrokConfig,
        dtype: jnp.dtype,
        quant: str | None = None,
        *,
        kernels: Kernels,
        name: str | None = None,
    ):
        super().__init__(name=name)
        self.config = config
        self.dtype = dtype
        self.quant = quant
        self.kernels = kernels

    def __call__(self, x: jax.Array, experts, impl: str = "auto") -> jax.Array:
        """x [B, T, D] -> [B, T, D].

        ``experts`` is (w1, w3, w2) of this layer: ``Kernels.layer_experts`` views or [E, ...]
        arrays. ``impl``: "auto" (the kernels' choice, ``Kernels.expert_path``), "gather",
        "blocks", "ragged" or "dense".
        """
        cfg, kernels = self.config, self.kernels
        d, e = cfg.hidden_size, cfg.num_local_experts
        init = hk.initializers.VarianceScaling(1.0, "fan_out", "truncated_normal")  # [out, in]
        router = hk.get_parameter("router", (e, d), jnp.float32, init=init)
        w_gate = kernels.dense(router)  # [E, D]
        w1, w3, w2 = experts

        b, t, _ = x.shape
        xm = x.reshape(b * t, d).astype(self.dtype)  # [M, D]
        weights, chosen, _ = route(
            xm,
            w_gate,
            cap=cfg.router_logit_softcapping,
            k=cfg.num_experts_per_tok,
            renormalize=cfg.moe_router_renormalize,
        )
        act = activation(cfg.hidden_act)
        if impl == "auto":
            m = xm.shape[0]
            impl = kernels.expert_path(m, m * cfg.num_experts_per_tok, e)
        fn = {
            "gather": moe_gather,
            "blocks": moe_blocks,
            "ragged": moe_ragged,
            "dense": moe_dense_reference,
        }[impl]
        return fn(xm, weights, chosen, w1, w3, w2, act, kernels=kernels).reshape(b, t, d)


class DenseMLP(hk.Module):
    """The residual (dense) MLP: ``down(act(x gate) * (x up))``. gate/up [F, D], down [D, F]."""

    def __init__(
        self,
        config: GrokConfig,
        dtype: jnp.dtype,
        quant: str | None = None,
        *,
        kernels: Kernels,
        name: str | None = None,
    ):
        super().__init__(name=name)
        self.config = config
        self.dtype = dtype
        self.quant = quant
        self.kernels = kernels

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> [B, T, D]."""
        d, f = self.config.hidden_size, self.config.intermediate_size
        init = hk.initializers.VarianceScaling(1.0, "fan_out", "truncated_normal")  # [out, in]
        dt, quant = self.dtype, self.quant
        gate = get_weight("gate_proj", (f, d), dt, init, quant=quant, in_dims=(1,))  # [F, D]
        up = get_weight("up_proj", (f, d), dt, init, quant=quant, in_dims=(1,))  # [F, D]
        down = get_weight("down_proj", (d, f), dt, init, quant=quant, in_dims=(1,))  # [D, F]
        act = activation(self.config.hidden_act)
        return _gated_mlp(x.astype(self.dtype), gate, up, down, act, self.kernels)


def residual_moe(dense_out: jax.Array | None, moe_out: jax.Array) -> jax.Array:
    """Grok-2: (dense + MoE) / sqrt 2; without a dense MLP (Grok-1): the MoE output alone."""
    if dense_out is None:
        return moe_out
    return (dense_out + moe_out) / jnp.asarray(SQRT2, moe_out.dtype)
