"""One Grok-1 release file read by parsing its pickle opcodes: nothing is ever unpickled.

This module is a security boundary: every byte it reads is data from a file that may be
hostile, and nothing in it may call a global the file names or hand the file's state to code
that trusts it.

``pickle.Unpickler``, even limited to numpy's names, hands numpy whatever state a file holds,
and ``numpy.dtype``/``ndarray.__setstate__`` trust it (a crafted dtype state places a field
outside its record and numpy writes out of bounds). pickle has no data-only mode and no
library reads these streams without running them, so the stream is walked here opcode by
opcode (``pickletools.genops`` decodes them) on a small stack machine that builds only inert
values: ints, strs, bytes, tuples, str-keyed dicts and records of the few allowed globals.
It accepts exactly what numpy's own pickling writes for an array of a plain numeric dtype
(protocols 2-5; module paths of numpy 1.x and 2.x), ``ml_dtypes.bfloat16``, and the
release's ``__main__.QuantizedWeight8bit`` record (``grok.grok1.release``); dtype, shape and
byte count are checked (against the leaf the config expects, when known) before an array is
built by ``np.frombuffer`` (from a buffer no one else holds, see ``_materialize``). Cost is
bounded: reads never exceed the file (whose size is checked against the leaf first), the memo
is a dict (an index costs nothing), and a stream may hold at most MAX_PICKLE_OPCODES opcodes.

The one entry point is ``load_release_pickle``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickletools
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from grok.errors import CheckpointError, UnsafePickleError
from grok.grok1.release import (
    FLOAT_DTYPES,
    Grok1Leaf,
    QuantizedWeight8bit,
    check_leaf_shape,
    check_quantized,
)

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
    ("__main__", "QuantizedWeight8bit"): "record",  # the release's record (release.py)
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


def _check_parsed(value: _Array | _Record, leaf: Grok1Leaf | None, leaves: list[Grok1Leaf]) -> None:
    """Dtypes, the record's block rule and (for a known leaf) the shape, before any array.

    The CheckpointError says what is wrong; ``load_release_pickle`` names the file."""
    if isinstance(value, _Record):
        assert value.state is not None
        weight, scales = value.state["weight"], value.state["scales"]
        check_quantized(weight.dtype, weight.shape, scales.dtype, scales.shape)
        if leaf is not None and not leaf.quantized:
            raise CheckpointError(
                f"{leaf.path} ({leaf.hf_name}) is released as a float array, found a "
                "QuantizedWeight8bit"
            )
        found = weight.shape
    else:
        if value.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"an unquantised tensor must be float32, bfloat16 or float16, found {value.dtype}"
            )
        found = value.shape
    if leaf is not None:
        check_leaf_shape(leaf, found, leaves)


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
    try:
        _check_parsed(parsed, leaf, leaves or ([] if leaf is None else [leaf]))
    except CheckpointError as err:
        raise type(err)(f"{path}: {err}") from None
    return _value_of(parsed)
