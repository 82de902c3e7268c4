"""Random weights of any config, for the tests and the benchmarks, and tiny checkpoints in the
released Grok-2 layout.

``random_params(config, seed, dtype=, quant=, scales=)`` is the one maker of random weights:
the tree comes from ``jax.eval_shape`` of the model's own init (``param_shapes``: no values,
no compile), then each leaf is filled by a counter hash of (seed, the leaf's path, the
element's index), uniform with the standard deviation ``scales`` gives it. The same values
come out, bit for bit, of two ways of computing them: with numpy on the host for the leaves up to
``HOST_ELEMENTS`` (no compile: the tests' tiny models), and by a compiled XLA program on the
default device, ``CHUNK_ELEMENTS`` at a time into one buffer, for larger ones (a full-width
Grok-2 layer, 8.4 GB in bf16, is made on an accelerator with no host copy and no float32
temporary of a whole weight). ``random_array`` makes one such weight outside a model's tree.

Why a hash and not ``jax.random``: the hash is one fused elementwise loop, 0.76 G values/s on
the 2-core CPU the figures come from against 0.03-0.05 G for ``jax.random`` (threefry, rbg)
and 0.04 G for numpy's normal draws; the full-width layer is made in seconds instead of
minutes, and numpy computes the same values without compiling anything.

``write_checkpoint`` is the product's writer (``grok.checkpoint.write_checkpoint``), which
here also takes a seed for random weights.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grok.checkpoint import params_to_hf
from grok.checkpoint import write_checkpoint as _write_checkpoint
from grok.config import GrokConfig
from grok.model import forward_fns
from grok.params import weight_specs
from grok.quant import QMAX, QUANT_DTYPES
from grok.rope import rope_table

HOST_ELEMENTS = 1 << 22  # leaves up to this many values are made with numpy (16 MiB float32)
CHUNK_ELEMENTS = 1 << 28  # values per compiled call on the device (a bf16 chunk is 512 MiB)
# Quantised weights: codes of this standard deviation (the largest is 28, inside e4m3's 448 and
# int8's 127; int8's rounding to whole codes adds 2% of noise), times a per-channel scale of
# std / QUANT_CODE_STD, so W = q * scale has the asked standard deviation.
QUANT_CODE_STD = 16.0
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio, odd: i -> i * _GOLDEN is a bijection mod 2^32
_HIGH = 0x85EBCA77  # another odd constant, for the index bits above 32
_UNIFORM_STD = 12**0.5  # width of a uniform of standard deviation 1 (1 / sqrt(12) per unit)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightScales:
    """Standard deviations of random weights.

    Attributes:
      matrix: of every matrix, or None for ``1 / sqrt(fan-in)`` (unit-scale activations).
      embedding: of the embedding; None: as ``matrix`` (fan-in D). An untied head is a
        matrix.
      router: of the router; None: as ``matrix``.
      norm_jitter: norm weights are ``1 + jitter * u`` (u of standard deviation 1); 0 gives
        ones, which would hide a swapped or transposed norm in a test.
    """

    matrix: float | None = 0.02
    embedding: float | None = None
    router: float | None = None
    norm_jitter: float = 0.0


# Hugging Face's ``initializer_range`` (0.02, as Mixtral's own init), norms 1: the benchmarks.
SMALL_INIT = WeightScales()
# Matrices 1/sqrt(fan-in), norms jittered: checkpoints for the loader's and the model's tests.
FAN_IN = WeightScales(matrix=None, norm_jitter=0.1)


@functools.lru_cache(maxsize=32)
def param_shapes(
    config: GrokConfig, dtype: Any = jnp.float32, quant: str | None = None
) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
    """The model's parameter tree as shapes and dtypes (``jax.eval_shape`` of its init):
    ``dtype`` the model dtype (the router stays float32), ``quant`` "fp8"/"int8" for
    quantised matrices (each with a float32 ``<name>_scale`` beside it)."""
    fns = forward_fns(config, jnp.dtype(dtype), "auto", quant)
    one = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(
        fns.init, jax.random.key(0), one, one, rope_table(config, 1), None, jnp.ones(1, jnp.int32)
    )


@dataclasses.dataclass(frozen=True)
class _Law:
    """One leaf's values: ``loc + spread * u`` (u uniform on [-1/2, 1/2)), rounded for int8
    codes, or the constant ``loc`` where ``spread`` is 0."""

    loc: float
    spread: float
    rounded: bool = False


def _law(config: GrokConfig, module: str, name: str, dtype: Any, scales: WeightScales) -> _Law:
    """What a leaf holds: norms, quantisation scales and codes, or plain weights."""
    if "norm" in module:
        return _Law(1.0, scales.norm_jitter * _UNIFORM_STD)
    base = name.removesuffix("_scale")
    std = scales.matrix
    if base == "embed_tokens" and scales.embedding is not None:
        std = scales.embedding
    elif base == "router" and scales.router is not None:
        std = scales.router
    if std is None:
        spec = _specs(config)[module, base]
        std = math.prod(spec.shape[d] for d in spec.in_dims) ** -0.5
    if name.endswith("_scale"):
        return _Law(std / QUANT_CODE_STD, 0.0)
    for kind, quant_dtype in QUANT_DTYPES.items():
        if jnp.dtype(dtype) == jnp.dtype(quant_dtype):
            return _Law(0.0, QUANT_CODE_STD * _UNIFORM_STD, rounded=kind == "int8")
    return _Law(0.0, std * _UNIFORM_STD)


@functools.lru_cache(maxsize=32)
def _specs(config: GrokConfig) -> dict:
    return {(s.module, s.name): s for s in weight_specs(config)}


def _key(seed: int, module: str, name: str) -> int:
    """The leaf's 32-bit key: its path's CRC-32 mixed with the seed (so the same weight gets
    the same values whatever else the tree holds, plain or quantised)."""
    path = f"{module}/{name}".encode()
    mixed = (zlib.crc32(path) ^ (seed * _GOLDEN)) & 0xFFFFFFFF
    return int(_fmix32(np.asarray([mixed], np.uint32))[0])


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser (every input bit flips every output bit with
    probability about 1/2), on numpy or JAX uint32 arrays alike."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _uniform(low, high, key):
    """Uniform on [-1/2, 1/2) from the element index (``low`` its 32 low bits, ``high`` the
    rest, uint32 arrays) and the leaf's key (a uint32 scalar); numpy or JAX alike."""
    h = _fmix32(low * np.uint32(_GOLDEN) + (high * np.uint32(_HIGH) + key))
    return (h >> 8).astype(np.float32) * np.float32(2.0**-24) - np.float32(0.5)


def _finish(u, law: _Law, dtype: Any, xp):
    x = u * np.float32(law.spread) + np.float32(law.loc)
    if law.rounded:
        x = xp.round(x)
    if jnp.dtype(dtype) in (jnp.dtype(q) for q in QUANT_DTYPES.values()):
        limit = QMAX["fp8" if jnp.dtype(dtype) == jnp.dtype(jnp.float8_e4m3fn) else "int8"]
        x = xp.clip(x, -limit, limit)
    return x.astype(dtype)


def _host_leaf(s: jax.ShapeDtypeStruct, law: _Law, key: int) -> np.ndarray:
    if law.spread == 0.0:
        return np.full(s.shape, law.loc, np.float32).astype(s.dtype)
    n = math.prod(s.shape)
    if n <= 1 << 32:
        low, high = np.arange(n, dtype=np.uint32), np.uint32(0)
    else:
        index = np.arange(n, dtype=np.uint64)
        low = (index & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        high = (index >> np.uint64(32)).astype(np.uint32)
    return _finish(_uniform(low, high, np.uint32(key)), law, s.dtype, np).reshape(s.shape)


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "law"))
def _device_chunk(start: jax.Array, key: jax.Array, *, shape, dtype, law: _Law) -> jax.Array:
    """Elements ``start + [0, prod(shape))`` of a leaf (``start`` as uint32 [low, high])."""
    local = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    low = start[0] + local
    high = start[1] + (low < start[0]).astype(jnp.uint32)  # the carry out of the low bits
    return _finish(_uniform(low, high, key), law, dtype, jnp)


@functools.partial(jax.jit, donate_argnames=("out",))
def _place(out: jax.Array, chunk: jax.Array, row: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(out, chunk, row, axis=0)


def _device_leaf(s: jax.ShapeDtypeStruct, law: _Law, key: int) -> jax.Array:
    """A leaf made on the default device, a chunk of whole rows (first axis) at a time."""
    if law.spread == 0.0:
        return jnp.full(s.shape, law.loc, s.dtype)
    row = math.prod(s.shape[1:])
    rows = max(1, min(s.shape[0], CHUNK_ELEMENTS // max(row, 1)))
    out = None
    for first in range(0, s.shape[0], rows):
        n = min(rows, s.shape[0] - first)
        start = first * row
        start_bits = jnp.asarray([start & 0xFFFFFFFF, start >> 32], jnp.uint32)
        chunk = _device_chunk(
            start_bits, jnp.uint32(key), shape=(n, *s.shape[1:]), dtype=s.dtype, law=law
        )
        if n == s.shape[0]:
            return chunk
        out = jnp.zeros(s.shape, s.dtype) if out is None else out
        out = _place(out, chunk, jnp.int32(first))
    return out


def _leaf(s: jax.ShapeDtypeStruct, law: _Law, key: int, host: bool) -> Any:
    if host:
        return _host_leaf(s, law, key)
    if math.prod(s.shape) <= HOST_ELEMENTS:
        return jnp.asarray(_host_leaf(s, law, key))
    return jax.block_until_ready(_device_leaf(s, law, key))


def random_params(
    config: GrokConfig,
    seed: int = 0,
    *,
    dtype: Any = jnp.float32,
    quant: str | None = None,
    scales: WeightScales = SMALL_INIT,
    host: bool = False,
) -> dict[str, dict[str, Any]]:
    """Random parameters of ``config``'s model: the Haiku tree of ``param_shapes(config,
    dtype, quant)``, each leaf uniform with the standard deviation ``scales`` gives it (norms
    around 1; quantised matrices as codes and per-channel scales whose product has it).

    Leaves up to ``HOST_ELEMENTS`` values are made with numpy and put on the default device;
    larger ones are made there by a compiled program (see the module docstring). ``host``:
    every leaf as a numpy array instead, nothing on a device.
    """
    out: dict[str, dict[str, Any]] = {}
    for module, leaves in sorted(param_shapes(config, jnp.dtype(dtype), quant).items()):
        out[module] = {}
        for name, s in sorted(leaves.items()):
            law = _law(config, module, name, s.dtype, scales)
            out[module][name] = _leaf(s, law, _key(seed, module, name), host)
    return out


def random_array(
    shape: tuple[int, ...], dtype: Any, std: float, *, seed: int = 0, name: str = ""
) -> jax.Array:
    """One random weight outside a model's tree, made as ``random_params`` makes its leaves
    (on the default device when large): uniform around 0 with standard deviation ``std``,
    keyed by ``seed`` and ``name``."""
    s = jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
    return _leaf(s, _Law(0.0, std * _UNIFORM_STD), _key(seed, "", name), host=False)


def random_hf_tensors(config: GrokConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under the released names (``FAN_IN`` scales: unit-scale
    activations, norms that are not all ones), made on the host."""
    return params_to_hf(config, random_params(config, seed, scales=FAN_IN, host=True))


def write_checkpoint(
    path: str | os.PathLike[str],
    config: GrokConfig,
    params_or_seed: int | Mapping[str, Any],
    *,
    tp: int = 8,
    dtype: Any = None,
    common_files: int = 2,
) -> Path:
    """``grok.checkpoint.write_checkpoint``, or with a seed: random weights of ``config``."""
    if isinstance(params_or_seed, int):
        params_or_seed = random_hf_tensors(config, params_or_seed)
    return _write_checkpoint(
        path, config, params_or_seed, tp=tp, dtype=dtype, common_files=common_files
    )
