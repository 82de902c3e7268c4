"""The model's operations on TPUs: XLA's (``XlaKernels``) but for attention (dense and paged)
and the experts, which run as Pallas kernels reading the KV cache, the server's page pool and
the stacked expert weights in place.

Glossary: B batch, T query positions, S cache slots, L layers, N query heads, K kv heads,
G = N / K, H head dim, E experts, A rows (token-expert assignments), D model width,
Fe expert width.

On a mesh each kernel runs inside ``jax.shard_map`` on the device's own shard: the specs come
from the rule table (``grok.sharding``), so the kernels see what the rest of the program
holds (kv heads and the expert width over ``model``, the batch over ``data``) and nothing is
gathered for them. What the compiler showed for the rest (Grok-2, v5p, 8 chips, compiled from
a CPU host; ``grok-plan --topology``):

- Weights [out, in] as released: XLA's dots read the attention, dense MLP and head weights in
  place in that layout (no copy or transpose of a parameter in the compiled programs); only
  ``ragged_dot`` wanted the experts as [E, In, Out] and copied them, hence the kernel.
- The embedding lookup of a table split over the vocabulary: XLA's partitioner gathers each
  token's row on the device holding it and sums (no all-gather of [V, D]).
- FP8 weights: XLA fuses the conversion to bfloat16 into the dots that read them, and the
  per-output-channel scale multiplies the float32 sums (``XlaKernels.project``).
- The cache write (``cache_write``): a dynamic update per row, in place in the donated cache.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from grok.kernels.tpu.flash_attention import flash_attention
from grok.kernels.tpu.grouped_matmul import grouped_matmul
from grok.kernels.tpu.paged_attention import paged_attention
from grok.kernels.xla import LayerExperts, XlaKernels
from grok.kv_cache import LayerCache
from grok.layers import QuantWeight
from grok.sharding import KV_CACHE_AXES, MODEL, ShardingRules, mesh_sizes

# The logical axes of the stacked expert weights (``grok.params``), for their shard specs.
W_IN_AXES = ("layers", "experts", "expert_mlp", "embed")  # w1, w3 [L, E, Fe, D]
W_OUT_AXES = ("layers", "experts", "embed", "expert_mlp")  # w2 [L, E, D, Fe]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CacheLayer:
    """Layer ``layer`` of the whole cache ``whole`` [L, B, S, K, H], not sliced out: what
    ``TpuKernels.cache_write`` hands to ``attend`` (the kernel reads the layer in place)."""

    whole: jax.Array
    layer: jax.Array


def _stacked(w) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """An expert weight as (values [L, E, Out, In], scales [L, E, Out, 1] or None, layer):
    a ``LayerExperts`` view (or a ``QuantWeight`` of two) as the stacked arrays it reads, a
    plain [E, Out, In] weight as one layer."""
    q, scale = (w.q, w.scale) if isinstance(w, QuantWeight) else (w, None)
    if isinstance(q, LayerExperts):
        return q.stacked, None if scale is None else scale.stacked, q.layer
    return q[None], None if scale is None else scale[None], jnp.zeros((), jnp.int32)


@dataclasses.dataclass(frozen=True)
class TpuKernels(XlaKernels):
    """XLA's operations with Pallas kernels for attention and the experts' products.

    Attributes:
      mesh: the ("data", "model") mesh the program runs on, or None for one device.
      interpret: run the kernels in Pallas' interpreter (tests on any backend).
    """

    platform: str | None = "tpu"
    mesh: Mesh | None = None
    interpret: bool = False

    def _spec(self, axes: tuple[str, ...], shape: tuple[int, ...], what: str) -> P:
        """The rule table's spec of an array of logical ``axes`` on the mesh (undivided: whole)."""
        sizes = mesh_sizes(self.mesh)
        return ShardingRules().partition_spec(axes, shape, sizes, what, strict=False)

    def _sharded(self, fn, in_specs, out_specs):
        """``fn`` on each device's shard (``jax.shard_map``), or as is without a mesh."""
        if self.mesh is None:
            return fn
        return jax.shard_map(
            fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )

    # The experts.

    def expert_path(self, tokens: int, assignments: int, experts: int) -> str:
        return "ragged"  # the kernel reads the chosen experts in place at every batch size

    def expert_mlp(self, xs, w1, w3, w2, sizes, row_group, gate) -> jax.Array:
        if any(isinstance(w, QuantWeight) and w.row_blocks for w in (w1, w3, w2)):
            # Row-block scales ("fp8-block": one per 128 inputs) are not the kernel's: XLA's
            # path, which dequantises those weights.
            return super().expert_mlp(xs, w1, w3, w2, sizes, row_group, gate)
        # Each device counts its own rows' experts (``sizes`` are the whole batch's).
        (q1, s1, layer), (q3, s3, _), (q2, s2, _) = (_stacked(w) for w in (w1, w3, w2))
        a = xs.shape[0]
        spec_in = self._spec(W_IN_AXES, q1.shape, "experts w1/w3")
        spec_out = self._spec(W_OUT_AXES, q2.shape, "experts w2")
        split_fe = spec_in[2] is not None  # each device holds an Fe slice: partial sums of w2
        data = self._spec(("batch",), (a,), "expert rows")[0]  # rows over data where it divides
        e = q1.shape[1]
        gm = functools.partial(grouped_matmul, interpret=self.interpret)

        def local(xs, row_group, q1, s1, q3, s3, q2, s2, layer):
            counts = jnp.bincount(row_group, length=e).astype(jnp.int32)  # this shard's rows
            h1 = gm(xs, q1, s1, layer, counts, out_dtype=xs.dtype)  # [A, Fe]
            h3 = gm(xs, q3, s3, layer, counts, out_dtype=xs.dtype)
            y = gm(gate(h1, h3), q2, s2, layer, counts)  # [A, D] float32
            if split_fe and self.mesh is not None:
                y = jax.lax.psum(y, MODEL)
            return y.astype(xs.dtype)

        def scale_spec(s, axes):  # a scale's unit (in) axis is never split
            return None if s is None else self._spec(axes, s.shape, "expert scales")

        in_specs = (
            P(data, None),
            P(data),
            spec_in,
            scale_spec(s1, W_IN_AXES),
            spec_in,
            scale_spec(s3, W_IN_AXES),
            spec_out,
            scale_spec(s2, W_OUT_AXES),
            P(),
        )
        fn = self._sharded(local, in_specs, P(data, None))
        return fn(xs, row_group, q1, s1, q3, s3, q2, s2, layer)

    # Attention and the KV cache.

    def cache_write(
        self, cache: LayerCache, k: jax.Array, v: jax.Array, start: jax.Array
    ) -> tuple[LayerCache, CacheLayer, CacheLayer]:
        # One scatter per array, each device its own rows: row b's [T, K, H] at
        # (layer, b, start[b] + t). (Vmapping a dynamic update over the batch axis, XLA
        # moved that axis first: a copy of the whole cache; a loop of updates carried the
        # cache in another layout than the kernel reads: two copies.)
        def write(k_all, v_all, k, v, start, layer):
            b, t = k.shape[:2]
            rows = jnp.arange(b)[:, None]  # [B, 1]
            slots = start[:, None] + jnp.arange(t)[None, :]  # [B, T]
            return tuple(
                whole.at[layer, rows, slots].set(new.astype(whole.dtype), mode="promise_in_bounds")
                for whole, new in ((k_all, k), (v_all, v))
            )

        cache_spec = self._spec(KV_CACHE_AXES, cache.k.shape, "KV cache")
        new_spec = P(cache_spec[1], None, cache_spec[3], None)  # [B, T, K, H]
        specs = (cache_spec, cache_spec, new_spec, new_spec, P(cache_spec[1]), P())
        fn = self._sharded(write, specs, (cache_spec, cache_spec))
        k_all, v_all = fn(cache.k, cache.v, k, v, start, cache.layer)
        cache = dataclasses.replace(cache, k=k_all, v=v_all)
        return cache, CacheLayer(k_all, cache.layer), CacheLayer(v_all, cache.layer)

    def attend(self, q, keys, values, tau, positions, lengths, *, scale, cap) -> jax.Array:
        if isinstance(keys, CacheLayer):
            k_all, v_all, layer = keys.whole, values.whole, keys.layer
        else:  # a plain forward's own keys [B, S, K, H]: one layer
            k_all, v_all, layer = keys[None], values[None], jnp.zeros((), jnp.int32)
        cache_spec = self._spec(KV_CACHE_AXES, k_all.shape, "KV cache")
        data, heads = cache_spec[1], cache_spec[3]
        attend = functools.partial(flash_attention, scale=scale, cap=cap, interpret=self.interpret)
        rows = (P(data, None), P(data, None), P(data))
        if self.mesh is None or heads is not None or mesh_sizes(self.mesh)[MODEL] == 1:
            # The kv heads split like the query heads (or not at all): each device its own.
            q_spec = P(data, None, heads, None, None)
            fn = self._sharded(
                lambda q, k, v, layer, *r: attend(q, k, v, layer, *r),
                (q_spec, cache_spec, cache_spec, P(), *rows),
                q_spec,
            )
            return fn(q, k_all, v_all, layer, tau, positions, lengths)
        return self._attend_replicated_kv(q, k_all, v_all, layer, tau, positions, lengths, attend)

    # The paged KV cache (the server's pool [L, M, Z, K, H], the kv heads over ``model``).

    def paged_attend(self, q, cache, tau, positions, lengths, *, scale, cap) -> jax.Array:
        attend = functools.partial(paged_attention, scale=scale, cap=cap, interpret=self.interpret)
        args = (q, cache.k, cache.v, cache.layer, cache.pages, tau, positions, lengths)
        if self.mesh is None:
            return attend(*args)
        split = mesh_sizes(self.mesh)[MODEL]
        if q.shape[2] % split:  # the kv heads do not split over model: XLA's gather
            logits = {"scale": scale, "cap": cap}
            return super().paged_attend(q, cache, tau, positions, lengths, **logits)
        heads = MODEL if split > 1 else None
        # Every row may read any page, so the pool stays whole over ``data`` and so do the
        # rows here; each device reads its own kv heads' pages.
        q_spec, pool = P(None, None, heads, None, None), P(None, None, None, heads, None)
        specs = (q_spec, pool, pool, P(), P(), P(), P(), P())
        return self._sharded(attend, specs, q_spec)(*args)

    def paged_width(self, pages: int, most: int, page_size: int) -> int:
        return most  # the kernel skips the pages past each row's length: one compile

    def _attend_replicated_kv(self, q, k_all, v_all, layer, tau, positions, lengths, attend):
        """The kv heads replicated over ``model`` (K smaller than it), the query heads split:
        each device's query heads read their one kv head of the cache in place (the kernel
        reads every head's block and keeps that one; slicing the head out first, XLA laid the
        whole cache out anew). XLA's attention where a device's heads span several kv heads."""
        b, t, kh, g, h = q.shape
        n = kh * g
        m = mesh_sizes(self.mesh)[MODEL]
        if n % m or g % (n // m):
            keys = jax.lax.dynamic_index_in_dim(k_all, layer, keepdims=False)
            values = jax.lax.dynamic_index_in_dim(v_all, layer, keepdims=False)
            logits = {"scale": attend.keywords["scale"], "cap": attend.keywords["cap"]}
            return super().attend(q, keys, values, tau, positions, lengths, **logits)
        local_heads = n // m
        cache_spec = self._spec(KV_CACHE_AXES, k_all.shape, "KV cache")
        data = cache_spec[1]

        def local(q, k_all, v_all, layer, tau, positions, lengths):  # q [B, T, N/m, H]
            kv_head = jax.lax.axis_index(MODEL) * local_heads // g
            q = q.reshape(*q.shape[:2], 1, local_heads, h)  # [B, T, 1, N/m, H]
            out = attend(q, k_all, v_all, layer, tau, positions, lengths, kv_head=kv_head)
            return out.reshape(*out.shape[:2], local_heads, h)

        q_spec = P(data, None, MODEL, None)
        rows = (P(data, None), P(data, None), P(data))
        fn = self._sharded(local, (q_spec, cache_spec, cache_spec, P(), *rows), q_spec)
        out = fn(q.reshape(b, t, n, h), k_all, v_all, layer, tau, positions, lengths)
        return out.reshape(b, t, kh, g, h)


__all__ = ["CacheLayer", "TpuKernels"]
