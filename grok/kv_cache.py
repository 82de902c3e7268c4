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
from grok.layers import as_bits, from_bits


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerView:
    """One layer's keys and values inside the whole cache, written and read in place.

    The layer loop carries the whole cache and hands each layer this view, so a step writes
    its new keys and values into the carried arrays where they lie and copies out only its own
    layer to read, instead of slicing every layer's cache out of the stack and stacking the
    results back (two more copies of the cache per step).

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

    def read(self) -> tuple[jax.Array, jax.Array]:
        """This layer's keys and values, each [B, S, K, H] in ``dtype``."""

        def take(whole: jax.Array) -> jax.Array:
            part = jax.lax.dynamic_index_in_dim(whole, self.layer, keepdims=False)
            return from_bits(part, self.dtype)

        return take(self.k), take(self.v)


def write_layer(cache_kv: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Writes ``new`` [B, T, K, H] into ``cache_kv`` [B, S, K, H] at slots start[b] .. + T."""

    def write_one(c, n, s):
        return jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (s, 0, 0))

    return jax.vmap(write_one)(cache_kv, new, start)
