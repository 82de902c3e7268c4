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

Here each leaf becomes the Hugging Face tensor(s) of ``docs/spec.md`` section 4, in
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
import math
import os
import pickletools
from collections.abc import Iterator
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np
from numpy.typing import DTypeLike

from grok.config import GrokConfig
from grok.errors import CheckpointError, ConfigError, UnsafePickleError

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
        for name in ("weight", "scales"):
            if not isinstance(getattr(self, name), np.ndarray):
                raise CheckpointError(
                    f"QuantizedWeight8bit {name} must be a numpy array, "
                    f"got {type(getattr(self, name)).__name__}"
                )
        _check_quantized(self.weight.dtype, self.weight.shape, self.scales.dtype, self.scales.shape)

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


def _check_quantized(
    weight_dtype: np.dtype,
    weight_shape: tuple[int, ...],
    scales_dtype: np.dtype,
    scales_shape: tuple[int, ...],
) -> None:
    """CheckpointError unless int8 weight and float scales follow the block rule."""
    if weight_dtype != np.int8:
        raise CheckpointError(f"QuantizedWeight8bit weight must be int8, found {weight_dtype}")
    if scales_dtype not in _FLOAT_DTYPES:
        raise CheckpointError(
            f"QuantizedWeight8bit scales must be bfloat16, float16 or float32, found {scales_dtype}"
        )
    if len(weight_shape) == 0 or len(scales_shape) != len(weight_shape):
        raise CheckpointError(
            f"QuantizedWeight8bit scales {scales_shape} must have the rank of weight {weight_shape}"
        )
    for axis, (n, s) in enumerate(zip(weight_shape, scales_shape, strict=True)):
        if s == 0 or n % s:
            raise CheckpointError(
                f"QuantizedWeight8bit scales {scales_shape} do not block weight {weight_shape}: "
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
#
# ``pickle.Unpickler``, even limited to numpy's names, hands numpy whatever state a file holds,
# and ``numpy.dtype``/``ndarray.__setstate__`` trust it (a crafted dtype state places a field
# outside its record and numpy writes out of bounds). pickle has no data-only mode and no
# library reads these streams without running them, so the stream is walked here opcode by
# opcode (``pickletools.genops`` decodes them) on a small stack machine that builds only inert
# values: ints, strs, bytes, tuples, str-keyed dicts and records of the few allowed globals.
# It accepts exactly what numpy's own pickling writes for an array of a plain numeric dtype
# (protocols 2-5; module paths of numpy 1.x and 2.x) and the release's QuantizedWeight8bit
# record; dtype, shape and byte count are checked (against the leaf the config expects, when
# known) before an array is built by ``np.frombuffer`` (from a buffer no one else holds, see
# ``_materialize``). Cost is bounded: reads never exceed the file (whose size is checked
# against the leaf first), the memo is a dict (an index costs nothing), and a stream may hold
# at most MAX_PICKLE_OPCODES opcodes.

# What numpy writes for one array is ~35 opcodes; a record with two arrays ~80.
MAX_PICKLE_OPCODES = 512
MAX_ARRAY_RANK = 8
# Bytes a leaf's file may hold beyond its payload (opcodes, names, the record's keys).
PICKLE_OVERHEAD_BYTES = 4096
# At most int8 weight + float32 scales of the weight's size: 5 bytes per element.
_MAX_BYTES_PER_ELEMENT = 5
# Reads at least this long (array data) go into a fresh bytearray an array may own.
_OWNED_BUFFER_BYTES = 1 << 16

_GLOBALS: dict[tuple[str, str], str] = {
    ("numpy.core.multiarray", "_reconstruct"): "reconstruct",  # numpy 1.x, protocols 2-4
    ("numpy._core.multiarray", "_reconstruct"): "reconstruct",  # numpy 2.x
    ("numpy.core.numeric", "_frombuffer"): "frombuffer",  # protocol 5
    ("numpy._core.numeric", "_frombuffer"): "frombuffer",
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    ("ml_dtypes", "bfloat16"): "bfloat16",
    ("_codecs", "encode"): "encode",  # protocol 2 spells bytes as _codecs.encode(str, 'latin1')
    _QUANTIZED_CLASS: "record",
}
# Plain numeric dtypes: numpy pickles each as numpy.dtype(code, False, True) + a state tuple.
_DTYPES: dict[Any, np.dtype] = {
    code: np.dtype(code)
    for code in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8")
}
_DTYPES["bfloat16"] = np.dtype(ml_dtypes.bfloat16)
# Opcodes that push their argument as it is.
_LITERALS = frozenset(
    ("BININT", "BININT1", "BININT2", "LONG1", "SHORT_BINUNICODE", "BINUNICODE")
    + ("SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8")
)
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False, "EMPTY_TUPLE": ()}


@dataclasses.dataclass(frozen=True)
class _Global:
    """An allowed global, by role (see ``_GLOBALS``); never the object itself."""

    role: str


class _DType:
    """``numpy.dtype(code, False, True)`` awaiting the BUILD that numpy always writes next."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype
        self.built = False


class _Array:
    """An array's description: dtype, shape, memory order and raw bytes, not yet an array."""

    def __init__(self) -> None:
        self.dtype: np.dtype | None = None
        self.shape: tuple[int, ...] = ()
        self.fortran = False
        self.raw: bytes | bytearray = b""


class _Record:
    """``__main__.QuantizedWeight8bit`` made by NEWOBJ, with its BUILD state once seen."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None


class _Refused(Exception):
    """A stream outside the accepted shapes; ``unsafe`` when it reached for code."""

    def __init__(self, message: str, *, unsafe: bool = False) -> None:
        super().__init__(message)
        self.unsafe = unsafe


class _BoundedReader:
    """The file as ``pickletools.genops`` reads it; a read never asks for more than remains."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f, self._size, self._pos = f, size, 0

    def read(self, n: int = -1) -> bytes | bytearray:
        n = self._size - self._pos if n < 0 else min(n, self._size - self._pos)
        if n < _OWNED_BUFFER_BYTES:
            data: bytes | bytearray = self._f.read(n)
        else:  # an array's data: a fresh buffer the array can own (see _materialize)
            data = bytearray(n)
            del data[self._f.readinto(data) :]
        self._pos += len(data)
        return data

    def readline(self) -> bytes:  # GLOBAL's "module\nname\n" (protocol 2); names are short
        data = self._f.readline(min(1024, self._size - self._pos))
        self._pos += len(data)
        return data

    def tell(self) -> int:
        return self._pos

    @property
    def remaining(self) -> int:
        return self._size - self._pos


def _show(x: Any, depth: int = 0) -> str:
    """A short description of a parsed value for messages (never the repr of raw bytes)."""
    if isinstance(x, bytes | bytearray):
        return repr(bytes(x)) if len(x) <= 8 else f"<{len(x)} bytes>"
    if isinstance(x, str):
        return repr(x) if len(x) <= 40 else repr(x[:40]) + "..."
    if x is None or isinstance(x, bool | int):
        return repr(x) if x is None or isinstance(x, bool) or abs(x) < 10**20 else "<huge int>"
    if isinstance(x, _Global):
        return f"<{x.role}>"
    if isinstance(x, _DType):
        return f"dtype({x.dtype})"
    if isinstance(x, tuple):
        if depth >= 2:
            return "(...)"
        inner = ", ".join(_show(v, depth + 1) for v in x[:6]) + (", ..." if len(x) > 6 else "")
        return f"({inner},)" if len(x) == 1 else f"({inner})"
    if isinstance(x, dict):
        if depth >= 2:
            return "{...}"
        return "{" + ", ".join(f"{_show(k, 2)}: {_show(v, depth + 1)}" for k, v in x.items()) + "}"
    return f"<{type(x).__name__.strip('_')}>"


def _resolve(module: Any, name: Any) -> _Global:
    role = (
        _GLOBALS.get((module, name)) if isinstance(module, str) and isinstance(name, str) else None
    )
    if role is None:
        allowed = ", ".join(sorted(f"{m}.{n}" for m, n in _GLOBALS))
        shown = f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else ""
        raise _Refused(
            f"refused global {shown[:200] or _show((module, name))}; a Grok-1 tensor file may "
            f"only reference {allowed}, in the shapes numpy and the release write",
            unsafe=True,
        )
    return _Global(role)


def _reduce(func: Any, args: Any) -> Any:
    """REDUCE of an allowed global, with exactly the arguments numpy writes."""
    role = func.role if isinstance(func, _Global) else None
    if role == "dtype":
        if not (isinstance(args, tuple) and len(args) == 3 and args[1:] == (False, True)):
            raise _Refused(f"numpy.dtype called with {_show(args)}, not (code, False, True)")
        code = "bfloat16" if args[0] == _Global("bfloat16") else args[0]
        if not isinstance(code, str) or code not in _DTYPES:
            raise _Refused(
                f"dtype {_show(code)} is not a plain numeric dtype (one of {', '.join(_DTYPES)})"
            )
        return _DType(_DTYPES[code])
    if role == "reconstruct":
        if args != (_Global("ndarray"), (0,), b"b"):
            raise _Refused(
                f"_reconstruct called with {_show(args)}, not (numpy.ndarray, (0,), b'b')"
            )
        return _Array()
    if role == "frombuffer":  # protocol 5: _frombuffer(buffer, dtype, shape, order)
        if not (isinstance(args, tuple) and len(args) == 4 and args[3] in ("C", "F")):
            raise _Refused(
                f"_frombuffer called with {_show(args)}, not (bytes, dtype, shape, order)"
            )
        array = _Array()
        _set_array(array, args[2], args[1], args[3] == "F", args[0])
        return array
    if role == "encode":
        if not (isinstance(args, tuple) and len(args) == 2 and isinstance(args[0], str)):
            raise _Refused(f"_codecs.encode called with {_show(args)}, not (str, 'latin1')")
        if args[1] != "latin1":
            raise _Refused(f"_codecs.encode called with encoding {_show(args[1])}, not 'latin1'")
        try:
            return args[0].encode("latin1")
        except UnicodeEncodeError:
            raise _Refused("_codecs.encode of a string that is not latin-1") from None
    raise _Refused(f"REDUCE of {_show(func)} is not part of a numpy array pickle")


def _set_array(array: _Array, shape: Any, dtype: Any, fortran: Any, raw: Any) -> None:
    if not isinstance(dtype, _DType) or not dtype.built:
        raise _Refused(f"array dtype is {_show(dtype)}, not a numpy.dtype numpy wrote")
    if not (isinstance(shape, tuple) and len(shape) <= MAX_ARRAY_RANK):
        raise _Refused(
            f"array shape {_show(shape)} is not a tuple of at most {MAX_ARRAY_RANK} ints"
        )
    if not all(type(n) is int and n >= 0 for n in shape):
        raise _Refused(f"array shape {_show(shape)} is not a tuple of non-negative ints")
    if type(fortran) is not bool or not isinstance(raw, bytes | bytearray):
        raise _Refused("array state is not (version, shape, dtype, is_fortran, bytes)")
    expected = math.prod(shape) * dtype.dtype.itemsize
    if len(raw) != expected:
        raise _Refused(
            f"array {shape} of {dtype.dtype} needs {expected} bytes, the file holds {len(raw)}"
        )
    array.shape, array.dtype, array.fortran, array.raw = shape, dtype.dtype, fortran, raw


def _build(obj: Any, state: Any) -> None:
    """BUILD: the state numpy writes for a dtype or an array, or the record's two arrays."""
    if isinstance(obj, _DType) and not obj.built:
        expected = obj.dtype.__reduce__()[2]  # what this numpy writes for this dtype
        # The last entry holds numpy's flags; a user dtype's (bfloat16) differ by version and
        # are never used here, so only their type is checked.
        if not (
            isinstance(state, tuple)
            and len(state) == len(expected)
            and state[:-1] == expected[:-1]
            and type(state[-1]) is int
            and (state[-1] == expected[-1] or obj.dtype == _DTYPES["bfloat16"])
        ):
            raise _Refused(f"dtype {obj.dtype} state {_show(state)} is not numpy's {expected!r}")
        obj.built = True
    elif isinstance(obj, _Array) and obj.dtype is None:
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise _Refused(
                f"array state {_show(state)} is not (1, shape, dtype, is_fortran, bytes)"
            )
        _set_array(obj, state[1], state[2], state[3], state[4])
    elif isinstance(obj, _Record) and obj.state is None:
        if not isinstance(state, dict) or set(state) != {"weight", "scales"}:
            keys = sorted(map(repr, state)) if isinstance(state, dict) else type(state).__name__
            raise _Refused(
                "QuantizedWeight8bit state must be a dict with keys 'weight' and 'scales', "
                f"got {keys}"
            )
        if not all(isinstance(v, _Array) for v in state.values()):
            raise _Refused("QuantizedWeight8bit weight and scales must be numpy arrays")
        obj.state = dict(state)  # later SETITEMs on the memoised dict change nothing
    else:
        raise _Refused(f"BUILD of {type(obj).__name__} is not part of a numpy array pickle")


def _run(reader: _BoundedReader) -> _Array | _Record:
    """The value of a pickle stream made only of the accepted shapes (see above)."""
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}

    def pop(n: int = 1) -> list[Any]:
        floor = marks[-1] if marks else 0
        if len(stack) - floor < n:
            raise _Refused("stack underflow")
        items = stack[len(stack) - n :]
        del stack[len(stack) - n :]
        return items

    def pop_mark() -> list[Any]:
        if not marks:
            raise _Refused("no MARK to pop to")
        floor = marks.pop()
        items = stack[floor:]
        del stack[floor:]
        return items

    def top() -> Any:
        if len(stack) <= (marks[-1] if marks else 0):
            raise _Refused("stack underflow")
        return stack[-1]

    for count, (op, arg, pos) in enumerate(pickletools.genops(reader)):
        if count >= MAX_PICKLE_OPCODES:
            raise _Refused(f"more than {MAX_PICKLE_OPCODES} opcodes; numpy writes far fewer")
        name = op.name
        if name == "PROTO":
            if arg not in (2, 3, 4, 5):
                raise _Refused(f"pickle protocol {arg}; numpy arrays are read at 2 to 5")
        elif name == "FRAME":
            pass  # framing only groups the opcodes that follow
        elif name in _LITERALS:
            stack.append(arg)
        elif name in _CONSTANTS:
            stack.append(_CONSTANTS[name])
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            stack.append(tuple(pop(int(name[-1]))))
        elif name == "MARK":
            marks.append(len(stack))
        elif name == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name in ("SETITEM", "SETITEMS"):
            items = pop(2) if name == "SETITEM" else pop_mark()
            target = top()
            if not isinstance(target, dict) or len(items) % 2:
                raise _Refused(f"{name} on {type(target).__name__}")
            for key, value in zip(items[::2], items[1::2], strict=True):
                if not isinstance(key, str) or len(target) >= 2 and key not in target:
                    raise _Refused(
                        f"dict key {_show(key)}: only the record's two str keys are read"
                    )
                target[key] = value
        elif name in ("MEMOIZE", "BINPUT", "LONG_BINPUT"):
            memo[len(memo) if name == "MEMOIZE" else arg] = top()
        elif name in ("BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise _Refused(f"memo index {arg} was never stored")
            stack.append(memo[arg])
        elif name == "GLOBAL":
            module, _, attr = arg.partition(" ")
            stack.append(_resolve(module, attr))
        elif name == "STACK_GLOBAL":
            module, attr = pop(2)
            stack.append(_resolve(module, attr))
        elif name == "REDUCE":
            func, args = pop(2)
            stack.append(_reduce(func, args))
        elif name == "NEWOBJ":
            cls, args = pop(2)
            if cls != _Global("record") or args != ():
                raise _Refused(f"NEWOBJ of {_show(cls)} with {_show(args)}", unsafe=True)
            stack.append(_Record())
        elif name == "BUILD":
            (state,) = pop(1)
            _build(top(), state)
        elif name == "STOP":
            if marks or len(stack) != 1:
                raise _Refused("the stream stops with an unbalanced stack")
            if reader.remaining:
                raise _Refused(f"{reader.remaining} bytes follow the end of the pickle")
            return _finished(stack[0])
        else:
            raise _Refused(
                f"opcode {name} at byte {pos} is not part of a numpy array or "
                "QuantizedWeight8bit pickle",
                unsafe=True,
            )
    raise _Refused("the stream ends without STOP")


def _finished(value: Any) -> _Array | _Record:
    if isinstance(value, _Array) and value.dtype is not None:
        return value
    if isinstance(value, _Record) and value.state is not None:
        if any(v.dtype is None for v in value.state.values()):
            raise _Refused("a QuantizedWeight8bit array never received its data")
        return value
    if isinstance(value, _Array | _Record):
        raise _Refused(f"the {type(value).__name__.strip('_').lower()} never received its data")
    raise _Refused(f"expected a numpy array or QuantizedWeight8bit, found {_show(value)}")


def _materialize(array: _Array, owned: set[int]) -> np.ndarray:
    """The array, built by ``np.frombuffer`` from its checked bytes.

    A large array's data was read into a fresh bytearray (``_BoundedReader``) that nothing
    else holds: the first array built from it keeps it instead of copying it (a 1.6 GB
    release file then needs 1.6 GB, not 3.2). Any other buffer, or one the memo let a second
    array reuse (its id is in ``owned``), is copied, so no two arrays share memory.
    """
    assert array.dtype is not None
    flat = np.frombuffer(array.raw, array.dtype, count=math.prod(array.shape))
    if array.fortran:
        return np.ascontiguousarray(flat.reshape(array.shape[::-1]).T)
    if isinstance(array.raw, bytearray) and id(array.raw) not in owned:
        owned.add(id(array.raw))
        return flat.reshape(array.shape)
    return flat.reshape(array.shape).copy()


def _parse_file(path: str, max_bytes: int | None) -> _Array | _Record:
    """Walks ``path``'s pickle stream (see above); CheckpointError/UnsafePickleError name it."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if max_bytes is not None and size > max_bytes:
                raise CheckpointError(
                    f"{path}: file of {size} bytes is larger than the {max_bytes} bytes its "
                    "tensor can take"
                )
            return _run(_BoundedReader(f, size))
    except _Refused as err:
        cls = UnsafePickleError if err.unsafe else CheckpointError
        raise cls(f"{path}: {err}") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot open ({err.strerror or err})") from None
    except ValueError as err:  # pickletools: a truncated stream or an unknown opcode byte
        raise CheckpointError(f"{path}: unreadable pickle ({err})") from None


def _check_parsed(
    path: str, value: _Array | _Record, leaf: Grok1Leaf | None, leaves: list[Grok1Leaf]
) -> None:
    """Dtypes, the record's block rule and (for a known leaf) the shape, before any array."""
    if isinstance(value, _Record):
        assert value.state is not None
        weight, scales = value.state["weight"], value.state["scales"]
        try:
            _check_quantized(weight.dtype, weight.shape, scales.dtype, scales.shape)
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from None
        if leaf is not None and not leaf.quantized:
            raise CheckpointError(
                f"{path}: {leaf.path} ({leaf.hf_name}) is released as a float array, found a "
                "QuantizedWeight8bit"
            )
        found = weight.shape
    else:
        if value.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(
                f"{path}: an unquantised tensor must be float32, bfloat16 or float16, "
                f"found {value.dtype}"
            )
        found = value.shape
    if leaf is not None:
        _check_leaf(path, leaf, found, leaves)


def _value_of(value: _Array | _Record) -> np.ndarray | QuantizedWeight8bit:
    owned: set[int] = set()
    if isinstance(value, _Record):
        assert value.state is not None
        return QuantizedWeight8bit(
            _materialize(value.state["weight"], owned), _materialize(value.state["scales"], owned)
        )
    return _materialize(value, owned)


def max_leaf_file_bytes(leaf: Grok1Leaf) -> int:
    """The largest file ``leaf`` can come in: int8 weight + float32 scales of equal size."""
    return math.prod(leaf.shape) * _MAX_BYTES_PER_ELEMENT + PICKLE_OVERHEAD_BYTES


def load_release_pickle(
    path: str | os.PathLike[str],
    leaf: Grok1Leaf | None = None,
    leaves: list[Grok1Leaf] | None = None,
) -> np.ndarray | QuantizedWeight8bit:
    """Reads one release file as it is stored: a float array, or int8 + scales (``[in, out]``).

    The file is parsed, never unpickled: only the opcode shapes numpy writes for an array of a
    plain numeric dtype (and bfloat16) and the release's ``__main__.QuantizedWeight8bit``
    record are accepted; any other global or opcode raises UnsafePickleError, anything else
    malformed CheckpointError. With ``leaf`` (and the config's ``leaves``, for a hint) the
    file size and the shape are checked against it before an array is built.
    """
    path = os.fspath(path)
    parsed = _parse_file(path, None if leaf is None else max_leaf_file_bytes(leaf))
    _check_parsed(path, parsed, leaf, leaves or ([] if leaf is None else [leaf]))
    return _value_of(parsed)


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
    path: str, leaf: Grok1Leaf, found: tuple[int, ...], leaves: list[Grok1Leaf]
) -> None:
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
        value = load_release_pickle(path, leaf, leaves)
        yield from _to_hf(leaf, value)


def read_grok1_checkpoint(
    ckpt_dir: str | os.PathLike[str], config: GrokConfig
) -> dict[str, np.ndarray | QuantizedWeight8bit]:
    """All tensors of a Grok-1 release keyed by Hugging Face name (see ``iter_grok1_tensors``)."""
    return dict(iter_grok1_tensors(ckpt_dir, config))
