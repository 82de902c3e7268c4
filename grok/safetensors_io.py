"""Safetensors files read and written on the raw format, with FP8 weights dequantised.

The ``safetensors`` package's numpy and flax readers fail on float8 tensors and read whole
tensors, so the library reads the format itself (``../shared/spec/grok2.md`` section 4):

    [u64 little-endian n][n bytes of JSON header, padded with spaces][raw tensor bytes]

The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the first byte after the header) and may hold ``"__metadata__"``, a
string-to-string map. Tensors are C-order, little-endian. Gaps between tensors' bytes and
bytes after the last tensor are accepted (the reference reader refuses them): they leave no
tensor's bytes in doubt, unlike overlaps, which are refused.

- ``SafetensorsFile`` checks the header on open, views tensors through ``numpy.memmap``
  without copying (``get``) and reads one slice of a tensor touching only its bytes
  (``get_slice``).
- ``CheckpointIndex`` reads every header in a directory and finds each tensor by name, with
  the tensor-parallel rank of the file that holds it (the Grok-2 release splits each expert
  matrix over 8 files ``...-TP-00R.safetensors``; ``...-TP-common.safetensors`` hold whole
  tensors).
- ``save_file`` writes the format byte for byte as the ``safetensors`` package does, float8
  and bfloat16 included, atomically.
- ``dequantize_fp8`` / ``read_weight`` turn re-published FP8 weights (``<name>`` in
  float8_e4m3fn beside ``<name>_scale`` or ``<name>_scale_inv``) back into floats, and
  ``quantize_fp8_per_channel`` / ``quantize_fp8_blockwise`` make them.

Weights are PyTorch ``[out, in]``: for an expert ``w1`` that is ``[Fe, D]``, for ``w2``
``[D, Fe]``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import threading
import types
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import EllipsisType
from typing import Any, Literal

import ml_dtypes
import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from grok.errors import CheckpointError

__all__ = [
    "E4M3_MAX",
    "FP8_BLOCK",
    "MAX_HEADER_BYTES",
    "SAFETENSORS_DTYPES",
    "CheckpointIndex",
    "SafetensorsFile",
    "TensorInfo",
    "dequantize_fp8",
    "dtype_from_safetensors",
    "dtype_to_safetensors",
    "index_directory",
    "quantize_fp8_blockwise",
    "quantize_fp8_per_channel",
    "read_header",
    "read_weight",
    "save_file",
    "tp_rank",
]

# Safetensors dtype names and the numpy / ml_dtypes dtypes they hold. The order is the
# format's own ranking of dtypes (the reference writer lays tensors out from the last of
# these to the first, then by name), which ``save_file`` follows so its bytes match.
# Multi-byte types are little-endian, as the format stores them; every host this library
# targets (x86-64, aarch64) is little-endian, so these are also the native dtypes.
SAFETENSORS_DTYPES: Mapping[str, np.dtype] = types.MappingProxyType(
    {
        "BOOL": np.dtype(np.bool_),
        "U8": np.dtype(np.uint8),
        "I8": np.dtype(np.int8),
        "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
        "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
        "I16": np.dtype("<i2"),
        "U16": np.dtype("<u2"),
        "F16": np.dtype("<f2"),
        "BF16": np.dtype(ml_dtypes.bfloat16),
        "I32": np.dtype("<i4"),
        "U32": np.dtype("<u4"),
        "F32": np.dtype("<f4"),
        "F64": np.dtype("<f8"),
        "I64": np.dtype("<i8"),
        "U64": np.dtype("<u8"),
    }
)
_NAME_OF_DTYPE = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_WRITE_RANK = {name: rank for rank, name in enumerate(SAFETENSORS_DTYPES)}

_FP8_DTYPES = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448, the largest finite e4m3
FP8_BLOCK = 128  # side of the square blocks that one ``_scale_inv`` entry covers

_HEADER_LEN_BYTES = 8  # the u64 that opens every file
_HEADER_ALIGN = 8  # the header is padded with spaces so tensor data starts 8-aligned
# The reference reader refuses headers over 100 MB; so does this one, so a damaged length
# field in a many-GB file fails fast instead of reading gigabytes as JSON.
MAX_HEADER_BYTES = 100_000_000
_METADATA_KEY = "__metadata__"
_ENTRY_KEYS = ("dtype", "shape", "data_offsets")
# Elements per step when (de)quantising, so temporaries stay small for [Fe, D]-sized matrices.
_CHUNK_ELEMENTS = 1 << 22

# ``...-TP-003.safetensors`` is rank 3 of a tensor-parallel split; ``...-TP-common...``
# and files without the marker hold whole tensors.
_TP_FILE = re.compile(r"-TP-(?:(?P<rank>\d+)|common)\.safetensors$")

BasicIndex = int | slice | EllipsisType | None | tuple[int | slice | EllipsisType | None, ...]


def dtype_from_safetensors(name: str) -> np.dtype:
    """The numpy dtype of safetensors dtype ``name`` (``"BF16"`` -> ``bfloat16``, ...)."""
    try:
        return SAFETENSORS_DTYPES[name]
    except KeyError:
        raise CheckpointError(
            f"unknown safetensors dtype {name!r}; known: {', '.join(SAFETENSORS_DTYPES)}"
        ) from None


def dtype_to_safetensors(dtype: DTypeLike) -> str:
    """The safetensors name of a numpy dtype (``bfloat16`` -> ``"BF16"``, ...)."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    try:
        return _NAME_OF_DTYPE[dt]
    except KeyError:
        known = ", ".join(str(d) for d in SAFETENSORS_DTYPES.values())
        raise CheckpointError(f"dtype {dt} has no safetensors name; supported: {known}") from None


def tp_rank(path: str | os.PathLike[str]) -> int | None:
    """Tensor-parallel rank of a file from its name: ``...-TP-003.safetensors`` -> 3.

    ``...-TP-common.safetensors`` and names without a ``-TP-`` marker give ``None``: such a
    file holds whole (unsharded) tensors.
    """
    match = _TP_FILE.search(Path(path).name)
    if match is None or match.group("rank") is None:
        return None
    return int(match.group("rank"))


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, its byte range there, and its TP rank.

    ``offset`` is the absolute byte offset of the tensor's first byte in ``path``;
    ``rank`` is the file's tensor-parallel rank (``None`` for a file of whole tensors).
    """

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    nbytes: int
    path: Path
    offset: int
    rank: int | None = None

    @property
    def safetensors_dtype(self) -> str:
        """The dtype as the header names it (``"BF16"``, ``"F8_E4M3"``, ...)."""
        return _NAME_OF_DTYPE[self.dtype]


def _pread_exact(fd: int, size: int, offset: int, path: Path, what: str) -> bytes:
    """``size`` bytes at ``offset``, or CheckpointError if the file ends first."""
    chunks = []
    remaining = size
    while remaining:
        chunk = os.pread(fd, remaining, offset + size - remaining)
        if not chunk:
            raise CheckpointError(
                f"{path}: {what}: expected {size} bytes at offset {offset}, the file ends "
                f"after {size - remaining} (truncated?)"
            )
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class _DuplicateKey(Exception):
    """A key seen twice in one JSON object of a header (json keeps the last silently)."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_header_fd(fd: int, path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check the header of the open file ``fd``; see ``read_header``."""
    file_size = os.fstat(fd).st_size
    if file_size < _HEADER_LEN_BYTES:
        raise CheckpointError(
            f"{path}: not a safetensors file: it has {file_size} bytes, fewer than the "
            f"{_HEADER_LEN_BYTES}-byte header length"
        )
    header_len = int.from_bytes(
        _pread_exact(fd, _HEADER_LEN_BYTES, 0, path, "header length"), "little"
    )
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{path}: header length field says {header_len} bytes, more than the "
            f"{MAX_HEADER_BYTES}-byte limit (damaged length field, or not a safetensors file)"
        )
    data_start = _HEADER_LEN_BYTES + header_len
    if data_start > file_size:
        raise CheckpointError(
            f"{path}: header length field says {header_len} bytes but only "
            f"{file_size - _HEADER_LEN_BYTES} follow it (truncated or damaged length field)"
        )
    raw = _pread_exact(fd, header_len, _HEADER_LEN_BYTES, path, "header")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as err:
        raise CheckpointError(f"{path}: header names {str(err)!r} twice") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: header is not valid UTF-8 JSON ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: header must be a JSON object, found {type(header).__name__}"
        )

    metadata = header.pop(_METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(
            f"{path}: {_METADATA_KEY} must be an object of string values, found {metadata!r}"
        )

    rank = tp_rank(path)
    data_size = file_size - data_start
    infos: dict[str, TensorInfo] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: entry must be an object, found {entry!r}")
        missing = [key for key in _ENTRY_KEYS if key not in entry]
        if missing:
            raise CheckpointError(f"{where}: entry lacks {', '.join(missing)}: {entry!r}")
        if not isinstance(entry["dtype"], str) or entry["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{where}: unknown dtype {entry['dtype']!r}; known: {', '.join(SAFETENSORS_DTYPES)}"
            )
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(
                f"{where}: shape must be a list of non-negative ints, found {shape!r}"
            )
        offsets = entry["data_offsets"]
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise CheckpointError(
                f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                f"found {offsets!r}"
            )
        begin, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise CheckpointError(
                f"{where}: data_offsets {offsets} span {end - begin} bytes but shape "
                f"{shape} of {entry['dtype']} needs {nbytes}"
            )
        if end > data_size:
            raise CheckpointError(
                f"{where}: data ends at byte {data_start + end} of the file but the file "
                f"has {file_size} bytes (truncated)"
            )
        infos[name] = TensorInfo(
            name=name,
            dtype=dtype,
            shape=tuple(shape),
            nbytes=nbytes,
            path=path,
            offset=data_start + begin,
            rank=rank,
        )
        if nbytes:
            ranges.append((begin, end, name))

    ranges.sort()
    for (_, prev_end, prev_name), (begin, _, name) in zip(ranges, ranges[1:], strict=False):
        if begin < prev_end:
            raise CheckpointError(
                f"{path}: data of tensors {prev_name!r} and {name!r} overlap (one ends at "
                f"data byte {prev_end}, the other begins at {begin})"
            )
    return infos, metadata


def read_header(
    path: str | os.PathLike[str],
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and check a file's header only: ``({name: TensorInfo}, metadata)``.

    Raises CheckpointError naming the file when the header is damaged or the data it
    describes overlaps or runs past the end of the file.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot open: {err.strerror}") from None
    try:
        return _read_header_fd(fd, path)
    finally:
        os.close(fd)


def _check_basic_index(index: Any, where: str) -> tuple[Any, ...]:
    items = index if isinstance(index, tuple) else (index,)
    for item in items:
        basic = (
            item is None
            or item is Ellipsis
            or isinstance(item, slice)
            or (isinstance(item, int | np.integer) and not isinstance(item, bool | np.bool_))
        )
        if not basic:
            raise CheckpointError(
                f"{where}: get_slice takes a basic index (ints, slices, ..., None), found {item!r}"
            )
    return items


class SafetensorsFile:
    """One safetensors file, its header checked on open and its tensors viewed in place.

    Use as a context manager, or call ``close``. Arrays returned by ``get`` stay valid
    after ``close`` (they keep the mapping alive); if another process shrinks the file
    while they exist, touching them may crash the process (SIGBUS), which ``get_slice``
    avoids for contiguous slices by reading with ``pread``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._fd: int | None = os.open(self.path, os.O_RDONLY)
        except OSError as err:
            raise CheckpointError(f"{self.path}: cannot open: {err.strerror}") from None
        try:
            self._infos, self._metadata = _read_header_fd(self._fd, self.path)
            self._file_size = os.fstat(self._fd).st_size
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise
        self._memmap: np.memmap | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self._infos)} tensors)"

    def close(self) -> None:
        """Close the file. Arrays already returned stay readable."""
        fd = getattr(self, "_fd", None)
        if fd is not None:
            self._fd = None
            os.close(fd)
        self._memmap = None

    @property
    def names(self) -> tuple[str, ...]:
        """Tensor names in header order."""
        return tuple(self._infos)

    @property
    def metadata(self) -> dict[str, str]:
        """The header's ``__metadata__`` map (empty when absent)."""
        return dict(self._metadata)

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape, size and place of tensor ``name``."""
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(
                f"{self.path}: no tensor {name!r} (the file holds {len(self._infos)} tensors)"
            ) from None

    def _open_fd(self) -> int:
        if self._fd is None:
            raise CheckpointError(f"{self.path}: file is closed")
        return self._fd

    def _mapped(self) -> np.memmap:
        self._open_fd()
        with self._lock:
            if self._memmap is None:
                # Map the file whose header was checked (through its descriptor), not
                # whatever the path names now.
                with os.fdopen(os.dup(self._open_fd()), "rb") as handle:
                    mapped = np.memmap(handle, dtype=np.uint8, mode="r")
                if mapped.size < self._file_size:
                    raise CheckpointError(
                        f"{self.path}: file shrank from {self._file_size} to {mapped.size} "
                        "bytes since it was opened"
                    )
                self._memmap = mapped
            return self._memmap

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a read-only view of the mapped file; nothing is read until used."""
        info = self.info(name)
        data = self._mapped()[info.offset : info.offset + info.nbytes]
        return data.view(info.dtype).reshape(info.shape)

    def get_slice(self, name: str, index: BasicIndex) -> np.ndarray:
        """A copy of ``tensor[index]`` for a basic index, reading only the bytes it needs.

        A slice that is contiguous in the file (a row range ``[r0:r1]`` of a C-order tensor,
        or an int on the leading axes) is one ``pread`` of exactly its bytes; any other slice
        (columns ``[:, c0:c1]``, strides) is copied from the mapping, which touches only
        the pages holding its elements.
        """
        where = f"{self.path}: tensor {name!r}"
        items = _check_basic_index(index, where)
        if not any(item is Ellipsis for item in items):
            items += (Ellipsis,)  # so an all-int index gives a 0-d view, not a scalar copy
        view = self.get(name)
        try:
            part = view[items]
        except IndexError as err:
            raise CheckpointError(
                f"{where}: index {index!r} does not fit shape {view.shape} ({err})"
            ) from None
        out = np.empty(part.shape, part.dtype)
        if part.size == 0:
            return out
        if not part.flags.c_contiguous:
            out[...] = part
            return out
        start = part.__array_interface__["data"][0] - self._mapped().__array_interface__["data"][0]
        buffer = memoryview(out.reshape(-1).view(np.uint8))
        fd = self._open_fd()
        done = 0
        while done < out.nbytes:
            got = os.preadv(fd, [buffer[done:]], start + done)
            if got == 0:
                raise CheckpointError(
                    f"{where}: file ends at byte {start + done}, inside the tensor (was the "
                    "file truncated after it was opened?)"
                )
            done += got
        return out


class CheckpointIndex:
    """Every ``*.safetensors`` file of a directory, found by tensor name.

    Headers are read on construction (every file, whatever its number); files are opened
    on first use. A name held by files of whole tensors (``-TP-common`` or no TP marker)
    has one entry; a name held by TP files has one entry per rank, ``0 .. tp_size-1``, in
    rank order (the Grok-2 release stitches expert ``w1``/``w3`` along dim 0 and ``w2``
    along dim 1; stitching is the loader's business).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a directory")
        self.files: tuple[Path, ...] = tuple(
            sorted(p for p in self.directory.glob("*.safetensors") if p.is_file())
        )
        if not self.files:
            raise CheckpointError(f"{self.directory}: no *.safetensors files")
        self._open_files: dict[Path, SafetensorsFile] = {}
        self._lock = threading.Lock()

        found: dict[str, list[TensorInfo]] = {}
        ranks: set[int] = set()
        for path in self.files:
            rank = tp_rank(path)
            if rank is not None:
                ranks.add(rank)
            infos, _ = read_header(path)
            for name, info in infos.items():
                found.setdefault(name, []).append(info)
        self.tp_size = len(ranks)  # number of TP ranks; 0 when no file is TP-sharded
        if ranks != set(range(self.tp_size)):
            raise CheckpointError(
                f"{self.directory}: TP files have ranks {sorted(ranks)}, expected 0 .. "
                f"{max(ranks)} with none missing"
            )
        self._entries: dict[str, tuple[TensorInfo, ...]] = {
            name: self._check_entries(name, infos) for name, infos in sorted(found.items())
        }

    def _check_entries(self, name: str, infos: list[TensorInfo]) -> tuple[TensorInfo, ...]:
        whole = [info for info in infos if info.rank is None]
        if len(whole) > 1:
            paths = ", ".join(info.path.name for info in whole)
            raise CheckpointError(f"{self.directory}: tensor {name!r} appears in {paths}")
        if whole and len(infos) > 1:
            paths = ", ".join(info.path.name for info in infos)
            raise CheckpointError(
                f"{self.directory}: tensor {name!r} is both whole and TP-sharded: {paths}"
            )
        if whole:
            return tuple(whole)
        sharded = sorted(infos, key=lambda info: info.rank)
        got = [info.rank for info in sharded]
        if got != list(range(self.tp_size)):
            raise CheckpointError(
                f"{self.directory}: tensor {name!r} is in TP ranks {got}, expected one slice "
                f"in each of ranks 0 .. {self.tp_size - 1}"
            )
        first = sharded[0]
        for info in sharded[1:]:
            if info.dtype != first.dtype or len(info.shape) != len(first.shape):
                raise CheckpointError(
                    f"{self.directory}: TP slices of tensor {name!r} disagree: "
                    f"{first.path.name} has {first.safetensors_dtype}{list(first.shape)}, "
                    f"{info.path.name} has {info.safetensors_dtype}{list(info.shape)}"
                )
        return tuple(sharded)

    def __enter__(self) -> CheckpointIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __repr__(self) -> str:
        return (
            f"CheckpointIndex({str(self.directory)!r}, {len(self.files)} files, "
            f"{len(self._entries)} tensors, tp_size={self.tp_size})"
        )

    def close(self) -> None:
        """Close every file opened so far."""
        with self._lock:
            for file in self._open_files.values():
                file.close()
            self._open_files.clear()

    @property
    def names(self) -> tuple[str, ...]:
        """Every tensor name, sorted."""
        return tuple(self._entries)

    def entries(self, name: str) -> tuple[TensorInfo, ...]:
        """Where ``name`` lives: one entry if whole, else one per TP rank in rank order."""
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(
                f"{self.directory}: no tensor {name!r} in any of {len(self.files)} files"
            ) from None

    def is_sharded(self, name: str) -> bool:
        """Whether ``name`` is split over the TP files."""
        return self.entries(name)[0].rank is not None

    def info(self, name: str, rank: int | None = None) -> TensorInfo:
        """The entry of a whole tensor (``rank=None``) or of one TP slice (``rank=R``)."""
        entries = self.entries(name)
        if entries[0].rank is None:
            if rank is not None:
                raise CheckpointError(
                    f"{self.directory}: tensor {name!r} is whole (in {entries[0].path.name}), "
                    f"not TP-sharded, but rank {rank} was asked for"
                )
            return entries[0]
        if rank is None or not 0 <= rank < len(entries):
            raise CheckpointError(
                f"{self.directory}: tensor {name!r} is split over {len(entries)} TP files; "
                f"pass rank in 0 .. {len(entries) - 1}, got {rank!r}"
            )
        return entries[rank]

    def open(self, path: Path) -> SafetensorsFile:
        """The (cached) open file ``path`` of this directory."""
        with self._lock:
            file = self._open_files.get(path)
            if file is None:
                file = self._open_files[path] = SafetensorsFile(path)
            return file

    def get(self, name: str, rank: int | None = None) -> np.ndarray:
        """Tensor ``name`` (or its TP slice ``rank``) as a read-only memmap view."""
        info = self.info(name, rank)
        return self.open(info.path).get(name)

    def get_slice(self, name: str, index: BasicIndex, rank: int | None = None) -> np.ndarray:
        """A copy of ``tensor[index]`` (of TP slice ``rank``); see ``SafetensorsFile.get_slice``."""
        info = self.info(name, rank)
        return self.open(info.path).get_slice(name, index)


def index_directory(path: str | os.PathLike[str]) -> dict[str, list[TensorInfo]]:
    """``{name: [TensorInfo, ...]}`` over every safetensors file in directory ``path``.

    Whole tensors have one entry (``rank`` None); TP-sharded ones one per rank, in rank
    order. See ``CheckpointIndex`` for the checks.
    """
    index = CheckpointIndex(path)
    return {name: list(index.entries(name)) for name in index.names}


def save_file(
    path: str | os.PathLike[str],
    tensors: Mapping[str, ArrayLike],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` to ``path`` in the safetensors format, atomically.

    Any dtype of ``SAFETENSORS_DTYPES`` (bfloat16 and float8 included). The layout is the
    reference writer's: tensors ordered by dtype rank (largest first) then name, header
    JSON without spaces, padded with spaces to a multiple of 8 bytes, so for the same
    tensors and at most one metadata key the bytes equal those of ``safetensors``
    (more metadata keys are written sorted; the reference writes them in hash order).
    The file is written to a temporary name beside ``path``, synced, then renamed over it.
    """
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or name == _METADATA_KEY:
            raise CheckpointError(f"{path}: cannot write a tensor named {name!r}")
        array = np.asarray(value)
        try:
            dtype_name = dtype_to_safetensors(array.dtype)
        except CheckpointError as err:
            raise CheckpointError(f"{path}: tensor {name!r}: {err}") from None
        # Little-endian, C-order; unlike ``np.ascontiguousarray`` this keeps 0-d arrays 0-d.
        arrays[name] = array.astype(SAFETENSORS_DTYPES[dtype_name], order="C", copy=False)
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: metadata must map strings to strings, got {metadata!r}")

    order = sorted(arrays, key=lambda n: (-_WRITE_RANK[dtype_to_safetensors(arrays[n].dtype)], n))
    header: dict[str, Any] = {}
    if metadata is not None:
        header[_METADATA_KEY] = dict(sorted(metadata.items()))
    offset = 0
    for name in order:
        array = arrays[name]
        header[name] = {
            "dtype": dtype_to_safetensors(array.dtype),
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    try:
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise CheckpointError(
            f"{path}: a name or metadata value is not valid text: {err}"
        ) from None
    raw += b" " * (-len(raw) % _HEADER_ALIGN)

    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot create {temp.name}: {err.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(len(raw).to_bytes(_HEADER_LEN_BYTES, "little"))
            out.write(raw)
            for name in order:
                out.write(arrays[name].reshape(-1).view(np.uint8).data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _row_chunks(rows: int, row_elements: int, multiple: int = 1) -> Iterator[tuple[int, int]]:
    """``(r0, r1)`` row ranges of about ``_CHUNK_ELEMENTS`` elements, starts on ``multiple``."""
    step = max(1, _CHUNK_ELEMENTS // max(1, row_elements) // multiple) * multiple
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def dequantize_fp8(
    q: np.ndarray,
    scale: ArrayLike,
    *,
    kind: Literal["scale", "scale_inv"],
    block: int = FP8_BLOCK,
    dtype: DTypeLike = np.float32,
    name: str = "q",
) -> np.ndarray:
    """FP8 weight ``q`` [out, in] times its scale, as ``dtype`` (float32 by default).

    ``kind="scale"`` (a ``<name>_scale`` tensor): ``scale`` is per tensor ([] or [1]) or per
    output channel ([out] or [out, 1]); W = q * s. ``kind="scale_inv"`` (a
    ``<name>_scale_inv`` tensor): one scale per ``block`` x ``block`` tile,
    [ceil(out/block), ceil(in/block)], the last row and column of tiles possibly partial;
    W = q * s on each tile. Works in row chunks, so a float32 copy of the whole of ``q``
    never exists beside the result. ``name`` is used in error messages.
    """
    q = np.asarray(q)
    s = np.asarray(scale, dtype=np.float32)
    if q.dtype not in _FP8_DTYPES:
        raise CheckpointError(f"{name}: expected a float8 tensor, found {q.dtype}")
    out = np.empty(q.shape, dtype)
    if kind == "scale":
        if s.shape in ((), (1,)):
            per_row = None
        elif q.ndim >= 1 and s.shape in ((q.shape[0],), (q.shape[0], 1)):
            per_row = s.reshape(q.shape[0], *([1] * (q.ndim - 1)))
        else:
            expected = "[]" if q.ndim == 0 else f"[] or [{q.shape[0]}] or [{q.shape[0]}, 1]"
            raise CheckpointError(
                f"{name}: _scale of shape {list(s.shape)} does not fit the weight's shape "
                f"{list(q.shape)}; expected {expected}"
            )
        if q.ndim == 0:
            out[...] = q.astype(np.float32) * s.reshape(())
            return out
        row_elements = math.prod(q.shape[1:])
        for r0, r1 in _row_chunks(q.shape[0], row_elements):
            factor = s.reshape(()) if per_row is None else per_row[r0:r1]
            out[r0:r1] = q[r0:r1].astype(np.float32) * factor
        return out
    if kind != "scale_inv":
        raise CheckpointError(f"{name}: kind must be 'scale' or 'scale_inv', got {kind!r}")
    if q.ndim != 2:
        raise CheckpointError(
            f"{name}: block scales need a 2-D weight [out, in], found shape {list(q.shape)}"
        )
    rows, cols = q.shape
    expected = (-(-rows // block), -(-cols // block))
    if s.shape != expected:
        raise CheckpointError(
            f"{name}: _scale_inv of shape {list(s.shape)} does not fit the weight's shape "
            f"{list(q.shape)} in {block}x{block} blocks; expected {list(expected)}"
        )
    for r0, r1 in _row_chunks(rows, cols, multiple=block):
        for b0 in range(r0, r1, block):
            b1 = min(r1, b0 + block)
            tile_row = np.repeat(s[b0 // block], block)[:cols]  # [in]
            out[b0:b1] = q[b0:b1].astype(np.float32) * tile_row
    return out


def _fp8_from_scaled(x: np.ndarray) -> np.ndarray:
    """Round float32 ``x`` (already divided by its scale) to float8_e4m3fn, saturating."""
    np.clip(x, -E4M3_MAX, E4M3_MAX, out=x)
    return x.astype(ml_dtypes.float8_e4m3fn)


def _finite_rows(w: np.ndarray, r0: int, what: str) -> None:
    if not np.all(np.isfinite(w)):
        row = r0 + int(np.argwhere(~np.isfinite(w))[0][0])
        raise CheckpointError(f"{what}: row {row} holds a non-finite value; cannot quantise")


def quantize_fp8_per_channel(w: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``w`` [out, in] -> (q float8_e4m3fn [out, in], scale float32 [out]), W ~= q * s[:, None].

    scale = amax(|w[row]|) / 448, so each row's largest value maps to +-448. An all-zero
    row gets scale 1 (its q is 0), so the scale is always a usable divisor.
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise CheckpointError(f"quantize_fp8_per_channel: expected [out, in], got {list(w.shape)}")
    rows, cols = w.shape
    q = np.empty(w.shape, ml_dtypes.float8_e4m3fn)
    scale = np.empty(rows, np.float32)
    for r0, r1 in _row_chunks(rows, cols):
        part = w[r0:r1].astype(np.float32)  # [rows in chunk, in]
        _finite_rows(part, r0, "quantize_fp8_per_channel")
        amax = np.max(np.abs(part), axis=1, initial=0.0)
        s = np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1)).astype(np.float32)
        scale[r0:r1] = s
        q[r0:r1] = _fp8_from_scaled(part / s[:, None])
    return q, scale


def quantize_fp8_blockwise(w: ArrayLike, block: int = FP8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """``w`` [out, in] -> (q float8_e4m3fn, scale_inv float32 [ceil(out/block), ceil(in/block)]).

    Each ``block`` x ``block`` tile (partial at the ragged edges) gets amax / 448; an
    all-zero tile gets 1. ``dequantize_fp8(q, scale_inv, kind="scale_inv")`` inverts it.
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise CheckpointError(f"quantize_fp8_blockwise: expected [out, in], got {list(w.shape)}")
    rows, cols = w.shape
    col_blocks = -(-cols // block)
    q = np.empty(w.shape, ml_dtypes.float8_e4m3fn)
    scale_inv = np.empty((-(-rows // block), col_blocks), np.float32)
    starts = np.arange(0, cols, block)
    for b0 in range(0, rows, block):
        part = w[b0 : b0 + block].astype(np.float32)  # [<=block, in]
        _finite_rows(part, b0, "quantize_fp8_blockwise")
        if cols:
            amax = np.maximum.reduceat(np.max(np.abs(part), axis=0), starts)  # [col_blocks]
        else:
            amax = np.zeros(0, np.float32)
        s = np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1)).astype(np.float32)
        scale_inv[b0 // block] = s
        q[b0 : b0 + block] = _fp8_from_scaled(part / np.repeat(s, block)[:cols])
    return q, scale_inv


def _sibling(
    source: SafetensorsFile | CheckpointIndex, name: str, rank: int | None
) -> np.ndarray | None:
    """Tensor ``name`` beside a weight, or None; for an index, the weight's TP rank if sharded."""
    if name not in source:
        return None
    if isinstance(source, SafetensorsFile):
        return source.get(name)
    return source.get(name, rank if source.is_sharded(name) else None)


def read_weight(
    source: SafetensorsFile | CheckpointIndex,
    name: str,
    *,
    rank: int | None = None,
    dtype: DTypeLike | None = None,
) -> np.ndarray:
    """Tensor ``name`` of a file or index, dequantised if it is stored as FP8.

    A float8 tensor must have a sibling ``<name>_scale`` or ``<name>_scale_inv`` (from the
    same TP rank when sharded); it comes back as ``dtype`` (float32 by default). Any other
    tensor comes back as stored (a read-only memmap view), or cast to ``dtype`` if given.
    ``rank`` picks the TP slice in a ``CheckpointIndex``; it must be None for a file.
    """
    if isinstance(source, SafetensorsFile):
        if rank is not None:
            raise CheckpointError(f"{source.path}: rank applies to a CheckpointIndex only")
        info = source.info(name)
        weight = source.get(name)
    else:
        info = source.info(name, rank)
        weight = source.get(name, rank)
    if info.dtype not in _FP8_DTYPES:
        if dtype is None or np.dtype(dtype) == weight.dtype:
            return weight
        return weight.astype(dtype)
    scale = _sibling(source, name + "_scale", rank)
    scale_inv = _sibling(source, name + "_scale_inv", rank)
    where = f"{info.path}: tensor {name!r}"
    if scale is not None and scale_inv is not None:
        raise CheckpointError(f"{where}: FP8 weight has both _scale and _scale_inv; ambiguous")
    if scale is None and scale_inv is None:
        raise CheckpointError(
            f"{where}: stored as {info.safetensors_dtype} but there is no {name}_scale or "
            f"{name}_scale_inv to dequantise it"
        )
    kind: Literal["scale", "scale_inv"] = "scale" if scale is not None else "scale_inv"
    return dequantize_fp8(
        weight,
        scale if scale is not None else scale_inv,
        kind=kind,
        dtype=np.float32 if dtype is None else dtype,
        name=where,
    )
