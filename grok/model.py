"""The decoder layer and the language model, as Haiku modules, and the pure forward function.

Glossary: B batch, T query positions, S cache slots, D model width, V vocab, L layers.

    h = embed[tokens] * embedding_multiplier_scale                      # [B, T, D]
    for each of the L layers (one scan over the layer index: compile time does not grow with L):
        h = h + post_attn_norm(Attention(pre_attn_norm(h)))
        x = pre_moe_norm(h)
        h = h + post_moe_norm((DenseMLP(x) + MoE(x)) / sqrt 2)          # Grok-1: MoE(x)
    logits = final_cap(final_norm(h) @ (lm_head * output_multiplier_scale)^T)

What depends on the platform (the weight products, the experts' grouped product, attention,
the KV cache's write and carried form, the embedding lookup, how each layer's weights are
read) is an operation of the kernels (``grok.kernels``), handed explicitly from
``forward_fns`` to every module.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

from grok.attention import Attention
from grok.config import GrokConfig
from grok.kernels import REFERENCE, Kernels
from grok.kv_cache import KVCache, LayerCache, PagedKVCache
from grok.layers import RMSNorm, soft_cap
from grok.moe import DenseMLP, MoE, expert_weights, residual_moe
from grok.rope import RopeTable, rope_table


class DecoderLayer(hk.Module):
    """One block: attention and the (residual) MoE, each between a pre- and a post-norm."""

    def __init__(
        self,
        config: GrokConfig,
        dtype: jnp.dtype,
        moe_impl: str = "auto",
        quant: str | None = None,
        *,
        kernels: Kernels,
        name: str | None = None,
    ):
        super().__init__(name=name)
        self.config = config
        self.dtype = dtype
        self.moe_impl = moe_impl
        self.quant = quant
        self.kernels = kernels

    def __call__(self, h, positions, rope_cos, rope_sin, layer_cache, kv_lengths, experts):
        """h [B, T, D] -> ([B, T, D], the layer cache with this step written, or None).

        ``experts``: this layer's (w1, w3, w2) from ``Kernels.layer_experts``.
        """
        cfg, dt, quant, kernels = self.config, self.dtype, self.quant, self.kernels
        eps = cfg.rms_norm_eps
        a, layer_cache = Attention(cfg, dt, quant, kernels=kernels, name="attn")(
            RMSNorm(eps, dt, name="pre_attn_norm")(h),
            positions,
            rope_cos,
            rope_sin,
            layer_cache,
            kv_lengths,
        )
        h = h + RMSNorm(eps, dt, name="post_attn_norm")(a)
        x = RMSNorm(eps, dt, name="pre_moe_norm")(h)
        dense = None
        if cfg.has_dense_mlp:
            dense = DenseMLP(cfg, dt, quant, kernels=kernels, name="mlp")(x)
        moe = MoE(cfg, dt, quant, kernels=kernels, name="moe")(x, experts, self.moe_impl)
        h = h + RMSNorm(eps, dt, name="post_moe_norm")(residual_moe(dense, moe))
        return h, layer_cache


class LanguageModel(hk.Module):
    """Embedding, L decoder layers, final norm and the (untied or tied) head."""

    def __init__(
        self,
        config: GrokConfig,
        dtype: jnp.dtype,
        moe_impl: str = "auto",
        quant: str | None = None,
        activation_sharding: jax.sharding.Sharding | None = None,
        *,
        kernels: Kernels,
    ):
        super().__init__(name="grok")
        self.config = config
        self.dtype = dtype
        self.moe_impl = moe_impl
        self.quant = quant
        self.activation_sharding = activation_sharding
        self.kernels = kernels

    def _constrain(self, h: jax.Array) -> jax.Array:
        """Pins the residual stream [B, T, D] at a block boundary (batch over ``data``)."""
        sharding = self.activation_sharding
        if sharding is None:
            return h
        data = sharding.spec[0]
        if data is not None and h.shape[0] % sharding.mesh.shape[data]:
            return h  # a batch the data axis does not divide is left to the compiler
        return jax.lax.with_sharding_constraint(h, sharding)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        rope: RopeTable,
        cache: KVCache | PagedKVCache | None,
        kv_lengths: jax.Array,
        logits_at: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | PagedKVCache | None]:
        """Logits [B, T, V] float32 (or [B, 1, V] at ``logits_at`` [B]) and the new cache (in
        the dtype and layout it came in: a paged cache keeps its page tables)."""
        cfg, dt, kernels = self.config, self.dtype, self.kernels
        v, d = cfg.vocab_size, cfg.hidden_size
        embed = hk.get_parameter(
            "embed_tokens", (v, d), dt, init=hk.initializers.TruncatedNormal(1.0)
        )  # [V, D]
        h = kernels.embed(embed, tokens) * jnp.asarray(cfg.embedding_multiplier_scale, dt)
        h = self._constrain(h)  # [B, T, D]
        rope_cos = rope.cos[positions]  # [B, T, H/2]
        rope_sin = rope.sin[positions]

        # Expert weights live outside the layer loop and are sliced by (layer, expert)
        # together, so a step reads (and copies) only the chosen experts' weights.
        stacked_experts = expert_weights(cfg, dt, self.quant)  # [L, E, ...] each
        kv_dtype = None if cache is None else cache.k.dtype
        # A paged cache's tables [B, W]: every layer reads and writes its pool through them.
        pages = cache.pages if isinstance(cache, PagedKVCache) else None

        def layer_fn(h, layer, kv):  # kv: the whole cache's (k, v) as the kernels carry it
            experts = tuple(kernels.layer_experts(w, layer) for w in stacked_experts)
            layer_cache = None if kv is None else LayerCache(*kv, layer, kv_dtype, pages)
            decoder = DecoderLayer(cfg, dt, self.moe_impl, self.quant, kernels=kernels, name=LAYER)
            h, layer_cache = decoder(
                h, positions, rope_cos, rope_sin, layer_cache, kv_lengths, experts
            )
            kv = None if layer_cache is None else (layer_cache.k, layer_cache.v)
            return self._constrain(h), kv

        carried = None if cache is None else kernels.carry(cache)
        kv = None if carried is None else (carried.k, carried.v)
        h, kv = _layer_loop(kernels, cfg.num_hidden_layers, layer_fn, h, kv)
        new_cache = None
        if cache is not None:
            new_k, new_v = kv
            new_cache = kernels.uncarry(
                dataclasses.replace(carried, k=new_k, v=new_v, lengths=kv_lengths), kv_dtype
            )

        if logits_at is not None:  # only one position per row needs the head (prefill)
            h = jnp.take_along_axis(h, logits_at[:, None, None], axis=1)  # [B, 1, D]
        out = RMSNorm(cfg.rms_norm_eps, dt, name="final_norm")(h)  # [B, T, D]
        if cfg.tie_word_embeddings:
            head = embed
        else:
            head = hk.get_parameter(
                "lm_head", (v, d), dt, init=hk.initializers.VarianceScaling(1.0, "fan_in")
            )  # [V, D]
        logits = kernels.project("BTD,VD->BTV", out, head, jnp.float32)
        logits = logits * cfg.output_multiplier_scale
        return soft_cap(logits, cfg.final_logit_softcapping), new_cache  # [B, T, V] float32


# The stacked per-layer parameters live under "grok/layers/layer/...": the loop's Haiku name
# and the decoder layer's module name inside it (as ``hk.layer_stack`` named them).
LAYERS = "layers"
LAYER = "layer"


def _layer_loop(kernels: Kernels, num_layers: int, layer_fn: Callable, h: jax.Array, kv):
    """The L decoder layers: one ``lax.scan`` over the layer index.

    ``layer_fn(h, layer, kv) -> (h, kv)`` builds one layer (its parameters: [L, ...] each,
    stacked under ``LAYERS``); ``kv`` is the carried cache's (k, v) or None. Each step gets its
    layer's weights from the kernels (``loop_weights`` / ``weights_at``: the XLA path lets the
    scan slice them, the CPU path reads the stacked arrays in place). Haiku state a layer sets
    (training's balance loss) comes out stacked [L].

    At init every layer's parameters are drawn from its own key, split as ``hk.layer_stack``
    splits them: a seed gives the parameters ``hk.layer_stack`` gave it.
    """
    inner = hk.transform_with_state(layer_fn)
    layer_ids = jnp.arange(num_layers, dtype=jnp.int32)  # [L]

    def init_layers(h, rng):
        def init_one(rng, layer):
            if rng is None:
                return None, inner.init(None, h, layer, kv)
            rng, next_rng, _ = jax.random.split(rng, 3)
            return next_rng, inner.init(rng, h, layer, kv)

        _, (params, state) = jax.lax.scan(init_one, rng, layer_ids)
        return params, state

    lifted, updater = hk.lift_with_state(init_layers, allow_reuse=True, name=LAYERS)
    params, state = lifted(h, hk.maybe_next_rng_key())
    hk.maybe_next_rng_key()  # hk.layer_stack drew a key here too: the keys after it unchanged
    scanned, fixed = kernels.loop_weights(params)

    def step(carry, xs):
        h, kv = carry
        layer, weights, layer_state = xs
        params = kernels.weights_at(weights, fixed, layer)
        (h, kv), layer_state = inner.apply(params, layer_state, None, h, layer, kv)
        return (h, kv), layer_state

    (h, kv), state = jax.lax.scan(step, (h, kv), (layer_ids, scanned, state))
    updater.update(state)
    return h, kv


@dataclasses.dataclass(frozen=True, eq=False)
class ForwardApply:
    """The model's apply: ``apply(params, tokens [B, T] int32, positions [B, T] int32, rope,
    cache, kv_lengths [B], logits_at [B] = None) -> (logits, cache)``, a pure function of its
    arguments (hashable by identity: a static argument of the compiled decode loops).

    ``kernels`` is the implementation it runs on; a decode loop holds the cache between steps
    in ``kernels.carry``'s form (see ``grok.kernels.base.Kernels.carry``).
    """

    transformed: hk.Transformed
    kernels: Kernels
    __name__: ClassVar[str] = "apply"  # what jit names the compiled programs after

    def __call__(self, params, tokens, positions, rope, cache, kv_lengths, logits_at=None):
        return self.transformed.apply(params, tokens, positions, rope, cache, kv_lengths, logits_at)


class ForwardFns(NamedTuple):
    init: Callable
    apply: ForwardApply


@functools.lru_cache(maxsize=64)
def forward_fns(
    config: GrokConfig,
    dtype: jnp.dtype,
    moe_impl: str = "auto",
    quant: str | None = None,
    activation_sharding: jax.sharding.Sharding | None = None,
    kernels: Kernels = REFERENCE,
) -> ForwardFns:
    """The model as a pair of pure functions (Haiku ``transform`` without an RNG in apply).

    ``apply(params, tokens [B,T] int32, positions [B,T] int32, rope, cache, kv_lengths [B])``
    returns ``(logits [B, T, V] float32, cache or None)``; with ``logits_at`` [B] (a position
    index per row) only those rows of the head are computed: logits [B, 1, V]. ``moe_impl``
    picks the expert path ("auto", "gather", "blocks", "ragged", "dense"); ``quant`` ("fp8",
    "int8" or None) says whether the matrices are stored quantised with per-output-channel
    scales (see ``layers.get_weight``). ``activation_sharding`` (e.g.
    ``grok.sharding.activation_sharding``) pins the residual stream at every block boundary on
    a mesh.

    ``kernels``: the implementation of the platform-dependent operations, from
    ``grok.kernels.select`` for the devices the program runs on (default: the XLA reference,
    with no platform-specific choice). The parameters are the same for every implementation,
    and so are the results (float32 rounding aside).
    """

    def fn(tokens, positions, rope, cache, kv_lengths, logits_at=None):
        model = LanguageModel(config, dtype, moe_impl, quant, activation_sharding, kernels=kernels)
        return model(tokens, positions, rope, cache, kv_lengths, logits_at)

    t = hk.without_apply_rng(hk.transform(fn))
    return ForwardFns(t.init, ForwardApply(t, kernels))


def init_params(config: GrokConfig, seed: int = 0, dtype: jnp.dtype = jnp.float32) -> dict:
    """Random parameters for ``config`` (Haiku's initialisers)."""
    fns = forward_fns(config, jnp.dtype(dtype))
    tokens = jnp.zeros((1, 1), jnp.int32)
    rope = rope_table(config, 1)
    return fns.init(jax.random.PRNGKey(seed), tokens, tokens, rope, None, jnp.ones((1,), jnp.int32))
