"""The KV cache: an explicit pytree passed into the model and returned by it.

It holds the K kv heads only (never the N repeated query heads), for every layer, and the
number of valid tokens per sequence. Slot ``s`` of sequence ``b`` holds the keys and values of
that sequence's token at position ``s``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from grok.config import GrokConfig
from grok.layers import Stacked, as_bits, from_bits


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer.

    Attributes:
      k: [L, B, S, K, H] keys (RoPE applied).
      v: [L, B, S, K, H] values.
      lengths: [B] int32, the number of valid slots of each sequence.
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @classmethod
    def create(
        cls, config: GrokConfig, batch_size: int, max_len: int, dtype: jnp.dtype = jnp.bfloat16
    ) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_len`` tokens."""
        shape = (
            config.num_hidden_layers,
            batch_size,
            max_len,
            config.num_key_value_heads,
            config.head_dim,
        )
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            lengths=jnp.zeros((batch_size,), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.lengths.nbytes

    def as_bits(self) -> KVCache:
        """k and v as uint16 views where ``layers.as_bits`` applies (16-bit floats on the CPU).

        What a decode loop or a server's state carries between steps: the model reads and
        writes the cache as bits, so ``from_bits`` at a step's start and ``as_bits`` at its end
        cancel out, where a bf16 cache made XLA:CPU copy the whole of it four times per step
        (bench-grok1 bf16, 12000 tokens: 14.5 -> 8.8 ms per token).
        """
        return dataclasses.replace(self, k=as_bits(self.k), v=as_bits(self.v))

    def from_bits(self, dtype: jnp.dtype) -> KVCache:
        """Undoes ``as_bits``: k and v back to ``dtype`` (unchanged when not bits)."""
        return dataclasses.replace(self, k=from_bits(self.k, dtype), v=from_bits(self.v, dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerView:
    """One layer's keys and values inside the whole cache, written and read in place.

    The layer loop carries the whole cache and hands each layer this view, so a step writes
    its new keys and values into the carried arrays where they lie and reads its own layer in
    place (the attention kernel) or copies out only that layer (the XLA path), instead of
    slicing every layer's cache out of the stack and stacking the results back (two more
    copies of the cache per step).

    Attributes:
      k, v: [L, B, S, K, H] (a 16-bit float cache may be its uint16 bits, ``layers.as_bits``).
      layer: () int32, this layer.
      dtype: the cache's own dtype.
    """

    k: jax.Array
    v: jax.Array
    layer: jax.Array
    dtype: jnp.dtype = dataclasses.field(metadata=dict(static=True))

    def write(self, k_new: jax.Array, v_new: jax.Array, start: jax.Array) -> LayerView:
        """The view with ``k_new``/``v_new`` [B, T, K, H] at slots start[b] .. + T of row b."""

        def put(whole: jax.Array, new: jax.Array) -> jax.Array:
            new = as_bits(new.astype(self.dtype))  # as the carried cache holds it

            # Row by row (B is static and small): a vmap over the batch axis made XLA:CPU
            # transpose the whole cache twice per layer.
            for b in range(new.shape[0]):
                at = (self.layer, jnp.int32(b), start[b], jnp.int32(0), jnp.int32(0))
                whole = jax.lax.dynamic_update_slice(whole, new[b][None, None], at)
            return whole

        return dataclasses.replace(self, k=put(self.k, k_new), v=put(self.v, v_new))

    def views(self) -> tuple[Stacked, Stacked]:
        """This layer's keys and values, each [B, S, K, H] in ``dtype``, as ``Stacked`` views
        of the whole cache: the attention kernel reads them in place, ``dense`` slices them
        out (as uint16 bits: a bf16 slice made XLA:CPU convert the whole cache)."""
        return (
            Stacked(self.k, (self.layer,), self.dtype),
            Stacked(self.v, (self.layer,), self.dtype),
        )


def write_layer(cache_kv: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Writes ``new`` [B, T, K, H] into ``cache_kv`` [B, S, K, H] at slots start[b] .. + T."""

    def write_one(c, n, s):
        return jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (s, 0, 0))

    return jax.vmap(write_one)(cache_kv, new, start)
