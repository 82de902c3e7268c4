"""The user-facing model object and ``load_pretrained``."""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grok.config import GrokConfig, load_config
from grok.errors import ConfigError, GenerationError, TokenizerError
from grok.kv_cache import KVCache
from grok.model import forward_fns
from grok.rope import RopeTable, rope_table


class Model:
    """A Grok model: config, parameters and the jitted forward pass.

    Attributes:
      config: the ``GrokConfig``.
      params: the Haiku parameter tree (``jax.Array`` leaves, possibly sharded).
      dtype: the compute/parameter dtype (router kept in float32).
      mesh: the device mesh the parameters live on, or None for one device.
      quant: None, or "fp8"/"int8" when matrices are kept quantised on the device.
    """

    def __init__(
        self,
        config: GrokConfig,
        params: dict[str, dict[str, jax.Array]],
        *,
        dtype: Any = jnp.bfloat16,
        mesh: jax.sharding.Mesh | None = None,
        moe_impl: str = "auto",
        quant: str | None = None,
    ):
        self.config = config
        self.params = params
        self.dtype = jnp.dtype(dtype)
        self.mesh = mesh
        self.moe_impl = moe_impl
        self.quant = quant
        self._fns = forward_fns(config, self.dtype, moe_impl, quant)
        self._apply = jax.jit(self._fns.apply)

    @functools.cached_property
    def rope(self) -> RopeTable:
        """The rotary table [P, H/2], P = max_position_embeddings."""
        return rope_table(self.config)

    def check_tokens(self, tokens: np.ndarray) -> None:
        """Raises TokenizerError for ids outside [0, V) and GenerationError past the context."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise GenerationError(f"tokens must be [B, T], got shape {list(tokens.shape)}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            bad = tokens[(tokens < 0) | (tokens >= self.config.vocab_size)][0]
            raise TokenizerError(
                f"token id {int(bad)} is outside the vocabulary [0, {self.config.vocab_size})"
            )
        if tokens.shape[1] > self.config.max_position_embeddings:
            raise GenerationError(
                f"sequence of {tokens.shape[1]} tokens is longer than the context "
                f"(max_position_embeddings = {self.config.max_position_embeddings})"
            )

    def logits(self, tokens: Any) -> jax.Array:
        """Full-sequence logits: int32 tokens [B, T] at positions 0..T-1 -> float32 [B, T, V]."""
        tokens_np = np.asarray(tokens)
        self.check_tokens(tokens_np)
        b, t = tokens_np.shape
        tokens_j = jnp.asarray(tokens_np, jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        lengths = jnp.full((b,), t, jnp.int32)
        out, _ = self._apply(self.params, tokens_j, positions, self.rope, None, lengths)
        return out

    def apply(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache | None,
        kv_lengths: jax.Array,
    ) -> tuple[jax.Array, KVCache | None]:
        """One jitted forward step (no input checks).

        tokens/positions [B, T] int32 (positions contiguous per row), cache or None,
        kv_lengths [B] valid cache slots after this step -> (logits [B, T, V] f32, cache).
        """
        return self._apply(self.params, tokens, positions, self.rope, cache, kv_lengths)

    def generate(
        self,
        prompts: Any,
        *,
        max_new_tokens: int,
        sampler: Any = None,
        seed: int | Any = 0,
        stop_tokens: Any = (),
        on_token: Any = None,
        return_logits: bool = False,
    ) -> Any:
        """Continues B prompts of token ids (any lengths) with prefill and cached decode.

        See ``grok.generate.generate`` for the arguments; returns a ``GenerationResult``.
        """
        from grok.generate import generate

        return generate(
            self,
            prompts,
            max_new_tokens=max_new_tokens,
            sampler=sampler,
            seed=seed,
            stop_tokens=stop_tokens,
            on_token=on_token,
            return_logits=return_logits,
        )

    def num_parameters(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.params))


def load_pretrained(
    path: str | os.PathLike[str],
    *,
    dtype: Any = jnp.bfloat16,
    mesh: jax.sharding.Mesh | None = None,
    quantize: str | None = None,
    config: GrokConfig | None = None,
) -> Model:
    """Loads a checkpoint in the released Grok-2 layout.

    Args:
      path: directory with ``config.json`` (or ``config_grok2_like.json``) and safetensors.
      dtype: parameter/compute dtype (``jnp.float32`` computes in float32 throughout).
      mesh: a device mesh to shard onto (see ``grok.sharding``); None for one device.
      quantize: None, or ``"fp8"`` to keep weights in float8 on the device.
      config: use this config instead of the directory's.
    """
    from grok.grok1 import is_grok1_checkpoint, load_grok1

    if is_grok1_checkpoint(path):  # Grok-1 ckpt-0 pickles (or their parent); see grok.grok1
        return load_grok1(path, config=config, dtype=dtype, quantize=quantize, mesh=mesh)
    from grok.checkpoint import ReleasedCheckpoint

    if mesh is not None:
        raise NotImplementedError("mesh loading lands with the checkpoint issue")
    if quantize is not None:
        raise NotImplementedError("quantize lands with the checkpoint issue")
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: not a checkpoint directory")
    config = config or load_config(path)
    with ReleasedCheckpoint(path, config) as ckpt:
        params = ckpt.load_params(jnp.dtype(dtype))
    return Model(config, params, dtype=dtype)
