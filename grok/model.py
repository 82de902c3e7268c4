"""The decoder layer and the language model, as Haiku modules, and the pure forward function.

Glossary: B batch, T query positions, S cache slots, D model width, V vocab, L layers.

    h = embed[tokens] * embedding_multiplier_scale                      # [B, T, D]
    for each of the L layers (one loop, so compile time does not grow with L):
        h = h + post_attn_norm(Attention(pre_attn_norm(h)))
        x = pre_moe_norm(h)
        h = h + post_moe_norm((DenseMLP(x) + MoE(x)) / sqrt 2)          # Grok-1: MoE(x)
    logits = final_cap(final_norm(h) @ (lm_head * output_multiplier_scale)^T)
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

from grok import native
from grok.attention import Attention
from grok.config import GrokConfig
from grok.kv_cache import KVCache, LayerView
from grok.layers import (
    RMSNorm,
    Stacked,
    as_bits,
    from_bits,
    native_kernels,
    project,
    soft_cap,
    stacked,
)
from grok.moe import DenseMLP, MoE, expert_weights, layer_experts, residual_moe
from grok.rope import RopeTable, rope_table


class DecoderLayer(hk.Module):
    """One block: attention and the (residual) MoE, each between a pre- and a post-norm."""

    def __init__(
        self,
        config: GrokConfig,
        dtype: jnp.dtype,
        moe_impl: str = "auto",
        quant: str | None = None,
        name=None,
    ):
        super().__init__(name=name)
        self.config = config
        self.dtype = dtype
        self.moe_impl = moe_impl
        self.quant = quant

    def __call__(self, h, positions, rope_cos, rope_sin, layer_cache, kv_lengths, experts):
        """h [B, T, D] -> ([B, T, D], updated layer cache or None).

        ``experts``: this layer's (w1, w3, w2) as ``layer_experts`` views.
        """
        cfg, dt = self.config, self.dtype
        eps = cfg.rms_norm_eps
        a, layer_cache = Attention(cfg, dt, self.quant, name="attn")(
            RMSNorm(eps, dt, name="pre_attn_norm")(h),
            positions,
            rope_cos,
            rope_sin,
            layer_cache,
            kv_lengths,
        )
        h = h + RMSNorm(eps, dt, name="post_attn_norm")(a)
        x = RMSNorm(eps, dt, name="pre_moe_norm")(h)
        dense = DenseMLP(cfg, dt, self.quant, name="mlp")(x) if cfg.has_dense_mlp else None
        f = residual_moe(dense, MoE(cfg, dt, self.quant, name="moe")(x, experts, self.moe_impl))
        h = h + RMSNorm(eps, dt, name="post_moe_norm")(f)
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
    ):
        super().__init__(name="grok")
        self.config = config
        self.dtype = dtype
        self.moe_impl = moe_impl
        self.quant = quant
        self.activation_sharding = activation_sharding

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
        cache: KVCache | None,
        kv_lengths: jax.Array,
        logits_at: jax.Array | None = None,
        layer_views: dict[str, dict[str, Stacked]] | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits [B, T, V] float32 (or [B, 1, V] at ``logits_at`` [B]) and the new cache.

        ``layer_views``: the layers' stacked parameters as ``Stacked`` views (keys relative to
        ``LAYERS_SCOPE``), from ``forward_fns`` when the native kernels are on; the layers then
        read them in place instead of through ``hk.layer_stack``'s per-layer slices.
        """
        cfg, dt = self.config, self.dtype
        v, d = cfg.vocab_size, cfg.hidden_size
        embed = hk.get_parameter(
            "embed_tokens", (v, d), dt, init=hk.initializers.TruncatedNormal(1.0)
        )  # [V, D]
        h = _take_rows(embed, tokens) * jnp.asarray(cfg.embedding_multiplier_scale, dt)  # [B,T,D]
        h = self._constrain(h)
        rope_cos = rope.cos[positions]  # [B, T, H/2]
        rope_sin = rope.sin[positions]

        # Expert weights live outside the layer loop and are sliced by (layer, expert)
        # together, so a step reads (and copies) only the chosen experts' weights.
        stacked_experts = expert_weights(cfg, dt, self.quant)  # [L, E, ...] each
        layer_ids = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)  # [L]

        def decoder_layer(h, layer_id, layer_cache):
            experts = tuple(layer_experts(w, layer_id) for w in stacked_experts)
            h, layer_cache = DecoderLayer(cfg, dt, self.moe_impl, self.quant, name=LAYER_NAME)(
                h, positions, rope_cos, rope_sin, layer_cache, kv_lengths, experts
            )
            return self._constrain(h), layer_cache

        # The cache enters the loop as uint16 views where as_bits applies (see layers.as_bits).
        caches = None if cache is None else (as_bits(cache.k), as_bits(cache.v), cache.k.dtype)
        if layer_views is None:
            loop = functools.partial(_stacked_loop, cfg.num_hidden_layers)
            h, new_bits = loop(decoder_layer, h, layer_ids, caches)
        else:
            h, new_bits = _view_loop(layer_views, decoder_layer, h, layer_ids, caches)
        new_cache = None
        if cache is not None:
            k_new = from_bits(new_bits[0], cache.k.dtype)
            v_new = from_bits(new_bits[1], cache.v.dtype)
            new_cache = KVCache(k=k_new, v=v_new, lengths=kv_lengths)

        if logits_at is not None:  # only one position per row needs the head (prefill)
            h = jnp.take_along_axis(h, logits_at[:, None, None], axis=1)  # [B, 1, D]
        out = RMSNorm(cfg.rms_norm_eps, dt, name="final_norm")(h)  # [B, T, D]
        if cfg.tie_word_embeddings:
            head = embed
        else:
            head = hk.get_parameter(
                "lm_head", (v, d), dt, init=hk.initializers.VarianceScaling(1.0, "fan_in")
            )  # [V, D]
        logits = project("BTD,VD->BTV", out, head, jnp.float32)
        logits = logits * cfg.output_multiplier_scale
        return soft_cap(logits, cfg.final_logit_softcapping), new_cache  # [B, T, V] float32


LAYERS_SCOPE = "grok/layers/"  # the Haiku scope of the stacked per-layer parameters
LAYER_NAME = "layer"  # the decoder layer's module name in it


def _stacked_loop(num_layers, decoder_layer, h, layer_ids, caches):
    """The layers under ``hk.layer_stack``: each step gets its layer's slice of every
    parameter and of the cache (``caches``: (k bits, v bits, dtype) or None), and the caches
    come back stacked. Used for init, training and on a mesh."""
    stack = hk.layer_stack(num_layers, with_per_layer_inputs=True, name="layers")

    def layer(h, layer_id, *layer_bits):
        layer_cache = None
        if layer_bits:  # this layer's slice of the cache, seen through as_bits
            layer_cache = tuple(from_bits(c, caches[2]) for c in layer_bits)
        with hk.custom_getter(_from_bits):
            h, layer_cache = decoder_layer(h, layer_id, layer_cache)
        if layer_cache is not None:
            layer_cache = tuple(as_bits(c) for c in layer_cache)
        return h, layer_cache

    return stack(layer)(h, layer_ids, *(caches[:2] if caches else ()))


def _view_loop(layer_views, decoder_layer, h, layer_ids, caches):
    """The layers as one ``lax.scan`` over the layer index whose steps read the stacked
    parameters through ``Stacked`` views (``project`` multiplies them in place) and write and
    read the whole cache, carried through the loop, through a ``LayerView``: the same
    parameters and results as ``_stacked_loop`` without a copy of every weight per step, and
    with each layer's cache read where it lies (the attention kernel) instead of the whole
    cache's restacking."""
    inner = hk.transform(lambda *args: decoder_layer(*args))

    def step(carry, layer_id):
        h, k_bits, v_bits = carry
        views = {
            module: {name: view[layer_id] for name, view in leaves.items()}
            for module, leaves in layer_views.items()
        }
        layer_cache = None if caches is None else LayerView(k_bits, v_bits, layer_id, caches[2])
        h, layer_cache = inner.apply(views, None, h, layer_id, layer_cache)
        if layer_cache is not None:
            k_bits, v_bits = layer_cache.k, layer_cache.v
        return (h, k_bits, v_bits), None

    k_bits, v_bits = (None, None) if caches is None else caches[:2]
    (h, k_bits, v_bits), _ = jax.lax.scan(step, (h, k_bits, v_bits), layer_ids)
    return h, (k_bits, v_bits)


# The per-layer weights enter the layer loop as uint16 views and each layer bitcasts its slice
# back (``layers.as_bits``): sliced as bf16, XLA:CPU read a float32 copy of every layer's
# weights, made once per call (measured: bf16 decode 110-120 tok/s instead of 98-101).


def _as_bits(params: dict) -> dict:
    """``params`` with the per-layer weights as uint16 views where ``as_bits`` applies."""
    return {
        module: {n: as_bits(x) for n, x in leaves.items()}
        if module.startswith(LAYERS_SCOPE)
        else leaves
        for module, leaves in params.items()
    }


# Up to this many ids (decode) ``_take_rows`` slices rows one by one instead of gathering.
ROWS_BY_SLICE = 16


def _take_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """``table[ids]`` for ``table`` [V, D] and int ``ids`` of any shape -> [*ids.shape, D].

    Through ``as_bits``: a bf16 gather made XLA:CPU convert the whole table to float32. A few
    ids (decode) are sliced one row at a time: a gather of the uint16 view made XLA:CPU copy
    the whole table first, every decode step (32 MB per token on bench-grok1); a slice reads
    its row in place.
    """
    bits = as_bits(table)
    if ids.size > ROWS_BY_SLICE:
        return from_bits(bits[ids], table.dtype)
    flat = ids.reshape(-1)
    rows = [jax.lax.dynamic_slice_in_dim(bits, flat[i], 1) for i in range(flat.shape[0])]
    return from_bits(jnp.concatenate(rows).reshape(*ids.shape, table.shape[1]), table.dtype)


# The stored dtype of each per-layer parameter ("layer/moe/router": bfloat16), by its name
# inside the layer stack, while ``forward_fns``' apply traces the stacked loop.
_STORED_DTYPES: contextvars.ContextVar[dict[str, jnp.dtype] | None] = contextvars.ContextVar(
    "grok_stored_dtypes", default=None
)


def _from_bits(next_getter, value, context):
    """Haiku getter: a uint16 view back to the parameter's stored dtype (the dtype the layer
    asked for when it is not known: a bf16 router asked for as float32 is bf16 bits, not
    integers)."""
    stored = (_STORED_DTYPES.get() or {}).get(context.full_name, context.original_dtype)
    return from_bits(next_getter(value), stored)


class ForwardFns(NamedTuple):
    init: Callable
    apply: Callable


@functools.lru_cache(maxsize=64)
def forward_fns(
    config: GrokConfig,
    dtype: jnp.dtype,
    moe_impl: str = "auto",
    quant: str | None = None,
    activation_sharding: jax.sharding.Sharding | None = None,
    native_kernels_on: bool | None = None,
) -> ForwardFns:
    """The model as a pair of pure functions (Haiku ``transform`` without an RNG in apply).

    ``apply(params, tokens [B,T] int32, positions [B,T] int32, rope, cache, kv_lengths [B])``
    returns ``(logits [B, T, V] float32, cache or None)``; with ``logits_at`` [B] (a position
    index per row) only those rows of the head are computed: logits [B, 1, V]. ``moe_impl``
    picks the expert path ("auto", "gather", "blocks", "dense"); ``quant`` ("fp8", "int8" or
    None) says whether the matrices are stored quantised with per-output-channel scales (see
    ``layers.get_weight``). ``activation_sharding`` (e.g. ``grok.sharding.activation_sharding``)
    pins the residual stream at every block boundary on a mesh.

    ``native_kernels_on``: whether apply reads the layers' weights and the cache in place
    through ``grok.native`` (its weight products, grouped MoE product and attention); None
    (default) turns it on where the kernel exists for ``dtype`` on the CPU backend, with no
    mesh and no quantisation. The parameters and the results are the same either way (float32
    rounding aside).
    """

    def fn(tokens, positions, rope, cache, kv_lengths, logits_at=None, layer_views=None):
        model = LanguageModel(config, dtype, moe_impl, quant, activation_sharding)
        return model(tokens, positions, rope, cache, kv_lengths, logits_at, layer_views)

    t = hk.without_apply_rng(hk.transform(fn))

    @functools.cache
    def use_native() -> bool:  # decided at the first trace: it may build the kernel
        if native_kernels_on is not None:
            return native_kernels_on
        return activation_sharding is None and quant is None and native.available(dtype)

    def apply(params, *args, **kwargs):
        if not use_native():
            stored = {
                f"{m[len(LAYERS_SCOPE) :]}/{n}": x.dtype
                for m, leaves in params.items()
                if m.startswith(LAYERS_SCOPE)
                for n, x in leaves.items()
            }
            token = _STORED_DTYPES.set(stored)
            try:
                return t.apply(_as_bits(params), *args, **kwargs)
            finally:
                _STORED_DTYPES.reset(token)
        outer = {m: leaves for m, leaves in params.items() if not m.startswith(LAYERS_SCOPE)}
        views = {
            m[len(LAYERS_SCOPE) :]: {n: stacked(x) for n, x in leaves.items()}
            for m, leaves in params.items()
            if m.startswith(LAYERS_SCOPE)
        }
        with native_kernels(True):
            return t.apply(outer, *args, layer_views=views, **kwargs)

    return ForwardFns(t.init, apply)


def init_params(config: GrokConfig, seed: int = 0, dtype: jnp.dtype = jnp.float32) -> dict:
    """Random parameters for ``config`` (Haiku's initialisers)."""
    fns = forward_fns(config, jnp.dtype(dtype))
    tokens = jnp.zeros((1, 1), jnp.int32)
    rope = rope_table(config, 1)
    return fns.init(jax.random.PRNGKey(seed), tokens, tokens, rope, None, jnp.ones((1,), jnp.int32))
