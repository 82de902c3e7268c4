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
class LayerCache:
    """One layer's place in the whole cache, as the layer loop carries it.

    The loop carries the whole cache and hands each layer this view, so a step writes its new
    keys and values where they lie (``Kernels.cache_write``) instead of the loop slicing every
    layer's cache out of the stack and stacking the results back.

    Attributes:
      k, v: [L, B, S, K, H] keys and values, in the form the kernels carry them
        (``Kernels.carry``: a 16-bit cache may be held as its uint16 bits).
      layer: () int32, this layer.
      dtype: the cache's own dtype.
    """

    k: jax.Array
    v: jax.Array
    layer: jax.Array
    dtype: jnp.dtype = dataclasses.field(metadata=dict(static=True))
