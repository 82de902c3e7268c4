"""The user-facing model object and ``load_pretrained``."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from grok.checkpoint import load
from grok.config import GrokConfig
from grok.distributed import to_global
from grok.generate import GenerationResult, TokenCallback, generate
from grok.kernels import Kernels, devices_of, select
from grok.kv_cache import KVCache
from grok.model import forward_fns
from grok.quant import mode_of
from grok.rope import RopeTable, rope_table
from grok.sampling import Sampler
from grok.sharding import ShardingRules, activation_sharding, auto_axes
from grok.tokens import check_token_ids


class Model:
    """A Grok model: config, parameters and the jitted forward pass.

    Attributes:
      config: the ``GrokConfig``.
      params: the Haiku parameter tree (``jax.Array`` leaves, possibly sharded).
      dtype: the compute/parameter dtype (router kept in float32).
      mesh: the device mesh the parameters live on (it may span processes: see
        ``grok.distributed``), or None for one device.
      quant: None, or the mode ("fp8", "fp8-block", "int8", ``grok.quant``) of matrices kept
        quantised on the device.
      kernels: the implementation of the platform-dependent operations, picked by
        ``grok.kernels.select`` for the mesh's devices, or else the parameters' device.
      apply_fn: the pure (un-jitted) Haiku apply function ``generate`` compiles.
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
        act_sharding = None
        if mesh is not None:
            self.mesh = mesh = auto_axes(mesh)  # Explicit axes (jax.make_mesh) run as Auto
            act_sharding = activation_sharding(mesh)
        self.kernels: Kernels = select(
            self.dtype, mesh=mesh, devices=_param_devices(params), quant=quant
        )
        self._fns = forward_fns(config, self.dtype, moe_impl, quant, act_sharding, self.kernels)
        self.apply_fn = self._fns.apply
        self._apply = jax.jit(self._fns.apply)

    def _put(self, value: np.ndarray) -> jax.Array:
        """Host data as an input: on a mesh, a global array replicated over it (each process
        builds its own devices' copies from the same value); else a one-device array."""
        if self.mesh is None:
            return jnp.asarray(value)
        return to_global(np.asarray(value), NamedSharding(self.mesh, PartitionSpec()))

    @functools.cached_property
    def rope(self) -> RopeTable:
        """The rotary table [P, H/2], P = max_position_embeddings (replicated on a mesh)."""
        table = rope_table(self.config)
        if self.mesh is None:
            return table
        return jax.tree.map(lambda x: self._put(np.asarray(x)), table)

    def check_tokens(self, tokens: Any) -> np.ndarray:
        """``tokens`` [B, T] as int64 ids (see ``grok.tokens.check_token_ids``): TokenizerError
        for ids outside [0, V), GenerationError for non-integers or more tokens than P."""
        return check_token_ids(
            tokens, vocab_size=self.config.vocab_size, context=self.config.max_position_embeddings
        )

    def logits(self, tokens: Any) -> jax.Array:
        """Full-sequence logits: int32 tokens [B, T] at positions 0..T-1 -> float32 [B, T, V].

        On a mesh the result stays on it; when the mesh spans processes, every process calls
        with the same tokens and ``grok.distributed.to_host(logits)`` (called on every
        process) brings the whole array to each host.
        """
        tokens_np = self.check_tokens(tokens)
        b, t = tokens_np.shape
        tokens_j = self._put(tokens_np.astype(np.int32))
        positions = self._put(np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)))
        lengths = self._put(np.full((b,), t, np.int32))
        out, _ = self._apply(self.params, tokens_j, positions, self.rope, None, lengths)
        return out

    def apply(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache | None,
        kv_lengths: jax.Array,
        logits_at: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """One jitted forward step (no input checks).

        tokens/positions [B, T] int32 (positions contiguous per row), cache or None,
        kv_lengths [B] valid cache slots after this step -> (logits [B, T, V] f32, cache).
        With ``logits_at`` [B] (one index into T per row) the logits are [B, 1, V].
        """
        return self._apply(self.params, tokens, positions, self.rope, cache, kv_lengths, logits_at)

    def generate(
        self,
        prompts: Sequence[Sequence[int]] | np.ndarray,
        *,
        max_new_tokens: int,
        sampler: Sampler | None = None,
        seed: int | Sequence[int] = 0,
        stop_tokens: Sequence[int] = (),
        on_token: TokenCallback | None = None,
        return_logits: bool = False,
    ) -> GenerationResult:
        """Continues B prompts of token ids (any lengths) with prefill and cached decode.

        See ``grok.generate.generate`` for the arguments (and for a mesh that spans
        processes: every process calls with the same arguments and gets the same result).
        """
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


def _param_devices(params: Any) -> set[jax.Device]:
    """The devices the parameters live on; parameters that are not yet device arrays (numpy)
    go to the default device, where the compiled program then runs."""
    return devices_of(params) or {jax.devices()[0]}


def load_pretrained(
    path: str | os.PathLike[str],
    *,
    dtype: Any = jnp.bfloat16,
    mesh: jax.sharding.Mesh | None = None,
    quantize: str | None = None,
    config: GrokConfig | None = None,
    rules: ShardingRules | None = None,
    device_memory_bytes: int | None = None,
    kv_batch: int = 0,
    kv_context: int = 0,
    quiet: bool = False,
    check_finite: bool = True,
) -> Model:
    """Loads a checkpoint in the released Grok-2 layout, optionally sharded and quantised.

    Before a byte of weight data is read: the mesh is checked against every dimension
    (``ShardingError``), the per-device memory is planned and checked (``MemoryPlanError``),
    and every safetensors header is validated (``CheckpointError``). Each process then reads
    only its own devices' shards, in parallel, with a progress bar on a terminal. A Grok-1
    ``ckpt-0`` folder (or its parent) loads too (see ``grok.grok1``).

    Args:
      path: directory with ``config.json`` (or ``config_grok2_like.json``) and safetensors,
        a Grok-1 ``ckpt-0``, or ``"builtin"`` (the small model shipped in the package).
      dtype: parameter/compute dtype (``jnp.float32`` computes in float32 throughout).
      mesh: a ("data", "model") device mesh: ``grok.sharding.make_mesh``,
        ``jax.make_mesh(shape, ("data", "model"))`` or ``Mesh(...)`` over any devices, with
        Explicit or Auto axes (the model runs on its Auto-axes twin); None: one device.
      quantize: None, or ``"fp8"`` to keep the matrices in float8_e4m3fn on the device with
        per-output-channel float32 scales (router, norms, embedding and head stay ``dtype``);
        an FP8 checkpoint's codes are kept as they are, its 128 x 128 tiles as "fp8-block"
        (``Model.quant`` says which; "fp8-block" may also be asked for: a scale per output
        channel and 128 inputs); ``"int8"`` for a Grok-1 checkpoint.
      config: use this config instead of the directory's.
      rules: a ``grok.sharding.ShardingRules`` (default: ``DEFAULT_RULES``).
      device_memory_bytes: memory of one device for the plan check; default: the device's
        ``memory_stats()["bytes_limit"]`` where the backend reports one, else no check.
      kv_batch, kv_context: a KV cache (B x S) the plan must leave room for.
      quiet: no progress bar even on a terminal.
      check_finite: check every weight for NaN/Inf as it is read (``CheckpointError`` naming
        the tensor); ``False`` skips it.
    """
    config, params = load(
        path,
        dtype=dtype,
        mesh=mesh,
        quantize=quantize,
        config=config,
        rules=rules,
        device_memory_bytes=device_memory_bytes,
        kv_batch=kv_batch,
        kv_context=kv_context,
        quiet=quiet,
        check_finite=check_finite,
    )
    mesh = auto_axes(mesh) if mesh is not None else None
    quant = mode_of(params, quantize)  # an FP8 checkpoint's tiles may make "fp8" "fp8-block"
    return Model(config, params, dtype=dtype, mesh=mesh, quant=quant)
