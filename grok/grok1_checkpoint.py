"""Grok-1's released checkpoint (``ckpt-0/tensor{i:05d}_000``), read without running pickle code.

Facts of the release (xai-org/grok-1 ``model.py``, ``checkpoint.py``, ``run.py``):

- The weights are one pickle per leaf of the Haiku parameter tree, file ``i`` holding leaf ``i``
  of ``jax.tree_util.tree_flatten`` of ``{module path: {param name: array}}``. JAX flattens a
  dict in sorted key order, so the files follow the *string* order of the module paths:
  ``language_model/...`` first, then ``transformer/decoder_layer_0``, ``_1``, ``_10``, ``_11``
  ... ``_19``, ``_2``, ``_20`` ... (layer 10 comes before layer 2), and inside a layer
  ``moe/linear``, ``moe/linear_1``, ``moe/linear_v``, ``multi_head_attention/{key,linear,query,
  value}``, ``rms_norm``, ``rms_norm_1``, ``rms_norm_2``, ``rms_norm_3``, ``router``.
  2 + 12 L files: 770 for L = 64. Only the ``_000`` copy of each is released.
- Shapes are JAX ``[in, out]``: ``in_out_embed/embeddings`` [V, D]; ``query/w`` [D, N*H];
  ``key/w``, ``value/w`` [D, K*H]; ``linear/w`` (attention output) [N*H, D]; every
  ``rms_norm*/scale`` [D]; ``router/w`` [D, E]; ``moe/linear/w`` (gate, W1) and
  ``moe/linear_v/w`` (up, W3) [E, D, Fe]; ``moe/linear_1/w`` (down, W2) [E, Fe, D]. The four
  norms are pre-attention, post-attention, pre-MoE and post-MoE, in that order. There is no
  output head (it is tied to the embedding) and no dense MLP.
- The pickles are protocol 4. Plain leaves (embedding, norms, router) are float32 numpy arrays
  (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``). The seven
  matrices of a layer are a ``__main__.QuantizedWeight8bit`` (the class was defined in the
  saving script; the release's loader puts it on ``sys.modules['__main__']``) whose state is
  ``{'weight': int8 array, 'scales': bfloat16 array}``. ``scales`` has the weight's rank: for
  the matrices whose output axis the release's 8-way model axis shards (query, key, value,
  moe/linear, moe/linear_v) it is ``[..., 1, out]``; for those whose input axis it shards
  (attention linear, moe/linear_1) it is ``[..., 8, out]``, one scale row per block of in/8
  rows. The weight is ``weight * scales`` with each scale row spread over its block.

Here each leaf becomes the Hugging Face tensor(s) of ``../shared/spec/grok2.md`` section 4, in
PyTorch ``[out, in]`` layout, experts split per expert. Quantised matrices stay quantised: a
``QuantizedWeight8bit`` whose int8 ``weight`` is ``[out, in]`` and whose ``scales`` follow the
block rule below, so ``o_proj`` has scales [D, 8] and ``w2`` [D, 8] (blocks of the input axis),
``q_proj``/``k_proj``/``v_proj``/``w1``/``w3`` scales [out, 1].

Block rule: ``scales`` has the rank of ``weight`` and each of its axes is 1 (broadcast), the
weight's length, or a divisor G of it, meaning G equal contiguous blocks along that axis share a
scale. The rule is the same before and after a transpose, so transposing both arrays together
keeps the meaning.

Shape letters: V vocab, D width, N query heads, K kv heads, H head dim, E experts,
Fe expert width, L layers, G scale blocks.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import struct
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np
from numpy.typing import DTypeLike

from grok.config import GrokConfig
from grok.errors import CheckpointError, ConfigError, UnsafePickleError

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

RELEASE_SUBDIR = "ckpt-0"
# The release's mesh is (data 1, model 8): a matrix sharded on its input axis got one scale
# row per shard.
RELEASE_MODEL_SHARDS = 8
INT8_MAX = 127

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))
_QUANTIZED_CLASS = ("__main__", "QuantizedWeight8bit")


def release_file_name(index: int) -> str:
    """The release's name for leaf ``index``: ``tensor{index:05d}_000``."""
    return f"tensor{index:05d}_000"


# Quantised weights.


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedWeight8bit:
    """An int8 weight and its scales; the value is ``weight * scales`` under the block rule.

    ``weight`` is int8. ``scales`` (bfloat16 in the release) has the same rank, and each of its
    axes is 1, the weight's length along that axis, or a divisor G of it (G contiguous blocks
    share a scale). In this library's dict the weight is ``[out, in]`` and the scales are
    ``[out, 1]`` or ``[out, G]``. The release pickles this record as
    ``__main__.QuantizedWeight8bit`` with state ``{'weight': ..., 'scales': ...}``.
    """

    weight: np.ndarray
    scales: np.ndarray

    def __post_init__(self) -> None:
        _check_quantized(self.weight, self.scales)

    def __setstate__(self, state: Any) -> None:
        # Called by pickle's BUILD on an instance made without __init__.
        if not isinstance(state, dict) or set(state) != {"weight", "scales"}:
            keys = sorted(map(repr, state)) if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(
                f"QuantizedWeight8bit state must be a dict with keys 'weight' and 'scales', "
                f"got {keys}"
            )
        _check_quantized(state["weight"], state["scales"])
        object.__setattr__(self, "weight", state["weight"])
        object.__setattr__(self, "scales", state["scales"])

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight.shape

    def transpose(self) -> QuantizedWeight8bit:
        """The same matrix transposed (last two axes), both arrays made contiguous."""
        return QuantizedWeight8bit(
            np.ascontiguousarray(np.swapaxes(self.weight, -1, -2)),
            np.ascontiguousarray(np.swapaxes(self.scales, -1, -2)),
        )

    def __getitem__(self, index: int) -> QuantizedWeight8bit:
        """Slice ``index`` of the leading axis (an expert), with the scales that cover it."""
        blocks = self.scales.shape[0]
        per_block = self.weight.shape[0] // blocks
        return QuantizedWeight8bit(self.weight[index], self.scales[index // per_block])


def _check_quantized(weight: Any, scales: Any) -> None:
    if not isinstance(weight, np.ndarray) or not isinstance(scales, np.ndarray):
        raise CheckpointError(
            "QuantizedWeight8bit needs numpy arrays, got weight "
            f"{type(weight).__name__} and scales {type(scales).__name__}"
        )
    if weight.dtype != np.int8:
        raise CheckpointError(f"QuantizedWeight8bit weight must be int8, found {weight.dtype}")
    if scales.dtype not in _FLOAT_DTYPES:
        raise CheckpointError(
            f"QuantizedWeight8bit scales must be bfloat16, float16 or float32, found {scales.dtype}"
        )
    if weight.ndim == 0 or scales.ndim != weight.ndim:
        raise CheckpointError(
            f"QuantizedWeight8bit scales {scales.shape} must have the rank of weight {weight.shape}"
        )
    for axis, (n, s) in enumerate(zip(weight.shape, scales.shape, strict=True)):
        if s == 0 or n % s:
            raise CheckpointError(
                f"QuantizedWeight8bit scales {scales.shape} do not block weight {weight.shape}: "
                f"axis {axis} has {s} scales for {n} entries (need 1, {n} or a divisor of {n})"
            )


def dequantize(qw: QuantizedWeight8bit, dtype: DTypeLike = np.float32) -> np.ndarray:
    """``weight * scales`` under the block rule, computed in float32 and cast to ``dtype``.

    int8 times a bfloat16 scale is exact in float32, so casting to bfloat16 afterwards gives
    the same numbers as the release's ``weight.astype(bf16) * scales`` computed as a bfloat16
    multiply that rounds the exact product.
    """
    weight_shape: list[int] = []
    scales_shape: list[int] = []
    for n, s in zip(qw.weight.shape, qw.scales.shape, strict=True):
        if s in (1, n):
            weight_shape.append(n)
            scales_shape.append(s)
        else:  # s blocks of n // s entries
            weight_shape += [s, n // s]
            scales_shape += [s, 1]
    weight = qw.weight.reshape(weight_shape).astype(np.float32)
    scales = qw.scales.reshape(scales_shape).astype(np.float32)
    return (weight * scales).reshape(qw.weight.shape).astype(dtype)


# The Grok-1 tree.


@dataclasses.dataclass(frozen=True)
class Grok1Leaf:
    """One released file: where its leaf sits in the Haiku tree and what it becomes.

    Attributes:
      index: the file is ``tensor{index:05d}_000``.
      module, param: the leaf is ``params[module][param]``.
      shape: release shape, JAX ``[in, out]`` (experts ``[E, in, out]``).
      hf_name: Hugging Face name; contains ``{e}`` when the leaf holds all E experts.
      transpose: the Hugging Face tensor is the transpose (``[out, in]``).
      quantized: the release stores it as int8 + scales.
      input_sharded: the release shards the input axis 8 ways, so its scales come in 8 row
        blocks (attention output and expert down projections).
    """

    index: int
    module: str
    param: str
    shape: tuple[int, ...]
    hf_name: str
    transpose: bool = False
    quantized: bool = False
    input_sharded: bool = False

    @property
    def file_name(self) -> str:
        return release_file_name(self.index)

    @property
    def path(self) -> str:
        return f"{self.module}/{self.param}"

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.hf_name

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Hugging Face name -> shape of every tensor this leaf becomes."""
        if self.per_expert:
            unit = self.shape[1:]
            unit = unit[::-1] if self.transpose else unit
            return {self.hf_name.format(e=e): unit for e in range(self.shape[0])}
        return {self.hf_name: self.shape[::-1] if self.transpose else self.shape}


def check_grok1_config(config: GrokConfig) -> None:
    """Raises ConfigError unless ``config`` describes a tree the Grok-1 release can fill."""
    if config.residual_moe:
        raise ConfigError(
            "Grok-1 checkpoints have no dense MLP, but the config has 'residual_moe' true"
        )
    if not config.tie_word_embeddings:
        raise ConfigError(
            "Grok-1 checkpoints have no lm_head (the head is the embedding), but the config "
            "has 'tie_word_embeddings' false"
        )


def grok1_leaves(config: GrokConfig) -> list[Grok1Leaf]:
    """Every released leaf for ``config``, in file order (JAX's sorted-key flatten order)."""
    check_grok1_config(config)
    V, D = config.vocab_size, config.hidden_size
    E, Fe = config.num_local_experts, config.moe_intermediate_size
    q_width = config.num_attention_heads * config.head_dim  # N*H
    kv_width = config.num_key_value_heads * config.head_dim  # K*H
    matrix = {"transpose": True, "quantized": True}
    leaves: dict[tuple[str, str], dict[str, Any]] = {}

    def add(module: str, param: str, shape: tuple[int, ...], hf_name: str, **kind: Any) -> None:
        leaves[(module, param)] = {"shape": shape, "hf_name": hf_name, **kind}

    add("language_model/in_out_embed", "embeddings", (V, D), "model.embed_tokens.weight")
    add("language_model/rms_norm", "scale", (D,), "model.norm.weight")
    for i in range(config.num_hidden_layers):
        layer, hf = f"transformer/decoder_layer_{i}", f"model.layers.{i}"
        attn, moe = f"{layer}/multi_head_attention", f"{layer}/moe"
        experts = f"{hf}.block_sparse_moe.experts.{{e}}"
        add(f"{attn}/query", "w", (D, q_width), f"{hf}.self_attn.q_proj.weight", **matrix)
        add(f"{attn}/key", "w", (D, kv_width), f"{hf}.self_attn.k_proj.weight", **matrix)
        add(f"{attn}/value", "w", (D, kv_width), f"{hf}.self_attn.v_proj.weight", **matrix)
        add(
            f"{attn}/linear",
            "w",
            (q_width, D),
            f"{hf}.self_attn.o_proj.weight",
            input_sharded=True,
            **matrix,
        )
        norms = ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm")
        for k, norm in enumerate(norms):
            suffix = f"_{k}" if k else ""
            add(f"{layer}/rms_norm{suffix}", "scale", (D,), f"{hf}.{norm}.weight")
        add(f"{layer}/router", "w", (D, E), f"{hf}.block_sparse_moe.gate.weight", transpose=True)
        add(f"{moe}/linear", "w", (E, D, Fe), f"{experts}.w1.weight", **matrix)
        add(f"{moe}/linear_v", "w", (E, D, Fe), f"{experts}.w3.weight", **matrix)
        add(
            f"{moe}/linear_1", "w", (E, Fe, D), f"{experts}.w2.weight", input_sharded=True, **matrix
        )
    # jax.tree_util flattens {module: {param: leaf}} in sorted key order at both levels.
    return [
        Grok1Leaf(index=index, module=module, param=param, **leaves[(module, param)])
        for index, (module, param) in enumerate(sorted(leaves))
    ]


def grok1_hf_shapes(config: GrokConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> ``[out, in]`` shape of every tensor a Grok-1 checkpoint yields."""
    shapes: dict[str, tuple[int, ...]] = {}
    for leaf in grok1_leaves(config):
        shapes.update(leaf.hf_shapes())
    return shapes


# Reading.


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,  # numpy 1.x pickles
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,  # numpy 2.x pickles
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("ml_dtypes", "bfloat16"): ml_dtypes.bfloat16,
    _QUANTIZED_CLASS: QuantizedWeight8bit,
}


class _ReleaseUnpickler(pickle.Unpickler):
    """Resolves only the globals the release's files use; anything else is refused unresolved."""

    def __init__(self, file: BinaryIO, path: str) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            allowed = ", ".join(sorted(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS))
            raise UnsafePickleError(
                f"{self._path}: refused to load global {module}.{name}; a Grok-1 tensor file "
                f"may only reference {allowed}"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._path}: refused persistent id {pid!r} in a Grok-1 file")


def load_release_pickle(path: str | os.PathLike[str]) -> np.ndarray | QuantizedWeight8bit:
    """Reads one release file as it is stored: a float array, or int8 + scales (``[in, out]``).

    Only numpy array reconstruction, ``ml_dtypes.bfloat16`` and ``__main__.QuantizedWeight8bit``
    may appear in the file; any other global raises UnsafePickleError before it is imported.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            value = _ReleaseUnpickler(f, path).load()
    except UnsafePickleError:
        raise
    except CheckpointError as err:  # a QuantizedWeight8bit record that breaks its rules
        raise CheckpointError(f"{path}: {err}") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot open ({err.strerror or err})") from None
    except Exception as err:  # any failure of a truncated or corrupt stream
        raise CheckpointError(f"{path}: unreadable pickle ({type(err).__name__}: {err})") from None
    if isinstance(value, QuantizedWeight8bit):
        return value
    if type(value) is not np.ndarray:
        raise CheckpointError(
            f"{path}: expected a numpy array or QuantizedWeight8bit, found {type(value).__name__}"
        )
    if value.dtype not in _FLOAT_DTYPES:
        raise CheckpointError(
            f"{path}: an unquantised tensor must be float32, bfloat16 or float16, "
            f"found {value.dtype}"
        )
    return value


def resolve_ckpt_dir(ckpt_dir: str | os.PathLike[str]) -> str:
    """The folder holding the tensor files: ``ckpt_dir`` itself or its ``ckpt-0`` subfolder."""
    ckpt_dir = os.fspath(ckpt_dir)
    nested = os.path.join(ckpt_dir, RELEASE_SUBDIR)
    if os.path.isdir(nested):
        return nested
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: Grok-1 checkpoint directory not found")
    return ckpt_dir


def _check_file_set(directory: str, leaves: list[Grok1Leaf]) -> None:
    expected = [leaf.file_name for leaf in leaves]
    present = {name for name in os.listdir(directory) if not name.startswith(".")}
    missing = [name for name in expected if name not in present]
    if missing:
        raise CheckpointError(
            f"{os.path.join(directory, missing[0])}: file missing ({len(missing)} of "
            f"{len(expected)} missing; a {len(leaves)}-leaf Grok-1 checkpoint has "
            f"{expected[0]} ... {expected[-1]})"
        )
    extra = sorted(present.difference(expected))
    if extra:
        raise CheckpointError(
            f"{os.path.join(directory, extra[0])}: unexpected file ({len(extra)} unexpected; "
            f"a {len(leaves)}-leaf Grok-1 checkpoint has only {expected[0]} ... {expected[-1]})"
        )


def _check_leaf(
    path: str, leaf: Grok1Leaf, value: np.ndarray | QuantizedWeight8bit, leaves: list[Grok1Leaf]
) -> None:
    found = value.shape
    if found == leaf.shape:
        return
    fits = [other for other in leaves if other.shape == found]
    hint = (
        f"; that shape fits {fits[0].path} ({fits[0].file_name}): is the config or the file "
        "order different?"
        if fits
        else ""
    )
    raise CheckpointError(
        f"{path}: {leaf.path} ({leaf.hf_name}) has shape {found}, expected {leaf.shape} "
        f"(JAX [in, out] layout){hint}"
    )


def _to_hf(
    leaf: Grok1Leaf, value: np.ndarray | QuantizedWeight8bit
) -> Iterator[tuple[str, np.ndarray | QuantizedWeight8bit]]:
    def layout(x: np.ndarray | QuantizedWeight8bit) -> np.ndarray | QuantizedWeight8bit:
        if not leaf.transpose:
            return x
        if isinstance(x, QuantizedWeight8bit):
            return x.transpose()
        return np.ascontiguousarray(x.T)

    if leaf.per_expert:
        for e in range(leaf.shape[0]):
            yield leaf.hf_name.format(e=e), layout(value[e])
    else:
        yield leaf.hf_name, layout(value)


def iter_grok1_tensors(
    ckpt_dir: str | os.PathLike[str], config: GrokConfig
) -> Iterator[tuple[str, np.ndarray | QuantizedWeight8bit]]:
    """Yields ``(hf_name, value)`` for a Grok-1 release, reading one file at a time.

    Values are ``[out, in]`` (spec section 4): float arrays as stored (float32 in the release)
    or ``QuantizedWeight8bit`` with int8 ``[out, in]`` weight and ``[out, 1]``/``[out, G]``
    scales. Experts come one at a time (``...experts.{e}.w1.weight`` [Fe, D], w3 [Fe, D],
    w2 [D, Fe]). The file set is checked before anything is yielded; each file's shape is
    checked against ``config`` when it is read.
    """
    leaves = grok1_leaves(config)
    directory = resolve_ckpt_dir(ckpt_dir)
    _check_file_set(directory, leaves)
    for leaf in leaves:
        path = os.path.join(directory, leaf.file_name)
        value = load_release_pickle(path)
        _check_leaf(path, leaf, value, leaves)
        yield from _to_hf(leaf, value)


def read_grok1_checkpoint(
    ckpt_dir: str | os.PathLike[str], config: GrokConfig
) -> dict[str, np.ndarray | QuantizedWeight8bit]:
    """All tensors of a Grok-1 release keyed by Hugging Face name (see ``iter_grok1_tensors``)."""
    return dict(iter_grok1_tensors(ckpt_dir, config))


# Writing (tests build small checkpoints in the release's format).


def _quantize(value: np.ndarray, blocks: int) -> QuantizedWeight8bit:
    """int8 + bfloat16 scales of ``value`` [..., in, out], one scale per column and row block."""
    *lead, n_in, n_out = value.shape
    grouped = value.astype(np.float32).reshape(*lead, blocks, n_in // blocks, n_out)
    absmax = np.max(np.abs(grouped), axis=-2)  # [..., G, out]
    scales = (absmax / INT8_MAX).astype(ml_dtypes.bfloat16)
    divisor = scales.astype(np.float32)
    divisor[divisor == 0] = 1.0
    quantized = np.clip(np.rint(grouped / divisor[..., None, :]), -INT8_MAX, INT8_MAX)
    return QuantizedWeight8bit(quantized.astype(np.int8).reshape(value.shape), scales)


def _from_hf(leaf: Grok1Leaf, tensors_hf: Mapping[str, np.ndarray]) -> np.ndarray:
    """The release-layout float32 value of ``leaf``, built from Hugging Face tensors."""

    def layout(name: str) -> np.ndarray:
        x = np.asarray(tensors_hf[name], dtype=np.float32)
        return x.T if leaf.transpose else x

    if leaf.per_expert:
        return np.stack([layout(name) for name in leaf.hf_shapes()])
    return np.ascontiguousarray(layout(leaf.hf_name))


def write_grok1_checkpoint(
    ckpt_dir: str | os.PathLike[str],
    config: GrokConfig,
    tensors_hf: Mapping[str, np.ndarray],
    *,
    quantize: bool = True,
) -> None:
    """Writes ``tensors_hf`` (Hugging Face names, ``[out, in]``) as a release ``ckpt-0`` folder.

    The files are what the release's own loader reads: protocol 4 pickles, one per leaf in
    the release's order, float32 numpy arrays, and (with ``quantize``) the matrices the release
    quantised as ``__main__.QuantizedWeight8bit`` with int8 weights and bfloat16 scales, one
    per output column and, for input-sharded matrices, per block of in/8 rows.
    """
    leaves = grok1_leaves(config)
    shapes = grok1_hf_shapes(config)
    missing = [name for name in shapes if name not in tensors_hf]
    if missing:
        raise CheckpointError(f"tensor {missing[0]} missing ({len(missing)} of {len(shapes)})")
    extra = sorted(set(tensors_hf).difference(shapes))
    if extra:
        raise CheckpointError(f"tensor {extra[0]} is not part of a Grok-1 checkpoint")
    for name, shape in shapes.items():
        found = tuple(np.shape(tensors_hf[name]))
        if found != shape:
            raise CheckpointError(f"tensor {name} has shape {found}, expected {shape}")
    directory = os.fspath(ckpt_dir)
    os.makedirs(directory, exist_ok=True)
    for leaf in leaves:
        value: np.ndarray | QuantizedWeight8bit = _from_hf(leaf, tensors_hf)
        if quantize and leaf.quantized:
            n_in = leaf.shape[-2]
            sharded = leaf.input_sharded and n_in % RELEASE_MODEL_SHARDS == 0
            value = _quantize(value, RELEASE_MODEL_SHARDS if sharded else 1)
        with open(os.path.join(directory, leaf.file_name), "wb") as f:
            _ReleasePickler(f).dump(value)


class _ReleasePickler:
    """Emits the release's pickle stream: protocol 4, globals spelled as the release spells them.

    The standard pickler would name this library's class and numpy 2's module paths; this
    writes ``__main__.QuantizedWeight8bit`` and ``numpy.core.multiarray._reconstruct`` as the
    release (saved under numpy 1.x) does. No memo and no frames: both are optional.
    """

    _GLOBALS: dict[Any, tuple[str, str]] = {
        _np_reconstruct: ("numpy.core.multiarray", "_reconstruct"),
        np.ndarray: ("numpy", "ndarray"),
        np.dtype: ("numpy", "dtype"),
        ml_dtypes.bfloat16: ("ml_dtypes", "bfloat16"),
    }

    def __init__(self, out: BinaryIO) -> None:
        self._out = out

    def dump(self, value: np.ndarray | QuantizedWeight8bit) -> None:
        self._out.write(b"\x80\x04")  # PROTO 4
        if isinstance(value, QuantizedWeight8bit):
            self._global(*_QUANTIZED_CLASS)
            self._out.write(b")\x81")  # EMPTY_TUPLE, NEWOBJ: cls.__new__(cls)
            self._out.write(b"}(")  # EMPTY_DICT, MARK
            for key in ("weight", "scales"):
                self._save(key)
                self._array(getattr(value, key))
            self._out.write(b"ub")  # SETITEMS, BUILD
        else:
            self._array(value)
        self._out.write(b".")  # STOP

    def _array(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self._reduce(_np_reconstruct, (np.ndarray, (0,), b"b"))
        self._out.write(b"(")  # MARK: state (version, shape, dtype, fortran, raw bytes)
        self._save(1)
        self._save(array.shape)
        self._reduce(*array.dtype.__reduce__())
        self._save(False)
        self._bytes(memoryview(array.reshape(-1).view(np.uint8)))
        self._out.write(b"tb")  # TUPLE, BUILD

    def _reduce(self, func: Any, args: tuple, state: Any = None) -> None:
        self._global(*self._GLOBALS[func])
        self._save(args)
        self._out.write(b"R")  # REDUCE
        if state is not None:
            self._save(state)
            self._out.write(b"b")  # BUILD

    def _global(self, module: str, name: str) -> None:
        self._save(module)
        self._save(name)
        self._out.write(b"\x93")  # STACK_GLOBAL

    def _bytes(self, data: bytes | memoryview) -> None:
        n = len(data)
        if n < 256:
            self._out.write(b"C" + struct.pack("<B", n))  # SHORT_BINBYTES
        elif n < 2**32:
            self._out.write(b"B" + struct.pack("<I", n))  # BINBYTES
        else:
            self._out.write(b"\x8e" + struct.pack("<Q", n))  # BINBYTES8
        self._out.write(data)

    def _save(self, obj: Any) -> None:
        out = self._out
        if obj is None:
            out.write(b"N")
        elif isinstance(obj, bool):
            out.write(b"\x88" if obj else b"\x89")  # NEWTRUE / NEWFALSE
        elif isinstance(obj, int):
            if 0 <= obj < 256:
                out.write(b"K" + struct.pack("<B", obj))  # BININT1
            elif 0 <= obj < 65536:
                out.write(b"M" + struct.pack("<H", obj))  # BININT2
            elif -(2**31) <= obj < 2**31:
                out.write(b"J" + struct.pack("<i", obj))  # BININT
            else:
                raw = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
                out.write(b"\x8a" + struct.pack("<B", len(raw)) + raw)  # LONG1
        elif isinstance(obj, str):
            raw = obj.encode("utf-8")
            if len(raw) < 256:
                out.write(b"\x8c" + struct.pack("<B", len(raw)) + raw)  # SHORT_BINUNICODE
            else:
                out.write(b"X" + struct.pack("<I", len(raw)) + raw)  # BINUNICODE
        elif isinstance(obj, bytes):
            self._bytes(obj)
        elif isinstance(obj, tuple):
            if len(obj) <= 3:
                for item in obj:
                    self._save(item)
                out.write((b")", b"\x85", b"\x86", b"\x87")[len(obj)])  # EMPTY_TUPLE, TUPLEn
            else:
                out.write(b"(")
                for item in obj:
                    self._save(item)
                out.write(b"t")
        elif obj in self._GLOBALS:
            self._global(*self._GLOBALS[obj])
        else:
            raise TypeError(f"the release's pickle format has no place for {type(obj).__name__}")


def release_pickle_bytes(value: np.ndarray | QuantizedWeight8bit) -> bytes:
    """The bytes ``write_grok1_checkpoint`` writes for one leaf (release layout ``[in, out]``)."""
    buffer = io.BytesIO()
    _ReleasePickler(buffer).dump(value)
    return buffer.getvalue()
