"""The safetensors files of a checkpoint directory, found by tensor name and TP rank.

Every header is opened and checked by the ``safetensors`` library (``safe_open``): its
JSON, dtypes, shapes and data offsets (no overlap, no gap, nothing past the end of the
file). Any error it raises becomes a ``CheckpointError`` naming the file.

The tensor bytes are read through a memory map of each file at the offsets of that checked
header, not through the library's ``get_slice``: on this project's 2-core CPU machine (the
same page-cached 512 MB file, 32 MB tensors) ``get_slice``/``get_tensor`` returned numpy
arrays at 1.2-1.4 GB/s and held the GIL (2 threads: no faster), against about 9 GB/s for a
numpy copy out of a memory map, which releases the GIL and so scales over a thread pool.
Reading the offsets is the only format code here: a JSON object the library has already
validated.

The Grok-2 release splits each expert matrix over 8 files ``...-TP-00R.safetensors``;
``...-TP-common.safetensors`` (and files without the marker) hold whole tensors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from grok.errors import CheckpointError

# Safetensors dtype names and the numpy / ml_dtypes dtypes they hold (little-endian, the
# native order of every host this library targets).
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
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
_NAME_OF_DTYPE = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_HEADER_LEN_BYTES = 8  # the little-endian u64 that opens every file

# ``...-TP-003.safetensors`` is rank 3 of a tensor-parallel split.
_TP_FILE = re.compile(r"-TP-(?:(?P<rank>\d+)|common)\.safetensors$")


def tp_rank(name: str | os.PathLike[str]) -> int | None:
    """Tensor-parallel rank of a file from its name (or path): ``...-TP-003.safetensors`` -> 3.

    ``...-TP-common.safetensors`` and names without a ``-TP-`` marker give ``None``.
    """
    match = _TP_FILE.search(Path(name).name)
    if match is None or match.group("rank") is None:
        return None
    return int(match.group("rank"))


def tp_file_pattern(names: tuple[str, ...], rank: int) -> str:
    """The file name pattern rank ``rank`` is expected under, given the names of the files
    there: ``*-TP-005.safetensors``."""
    width = 3
    for name in names:
        match = _TP_FILE.search(name)
        if match and match.group("rank") is not None:
            width = len(match.group("rank"))
            break
    return f"*-TP-{rank:0{width}d}.safetensors"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file's name, its byte offset there, and the file's TP rank.

    The file is named within its directory (``CheckpointFiles.directory``), which alone holds
    the directory's path: the tensors of a checkpoint do not each carry it.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    file: str  # the file's name: ``...-TP-003.safetensors``
    offset: int  # absolute byte offset of the tensor's first byte in ``file``
    rank: int | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def safetensors_dtype(self) -> str:
        """The dtype as the header names it (``"BF16"``, ``"F8_E4M3"``, ...)."""
        return _NAME_OF_DTYPE[self.dtype]


def read_header(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """``{name: TensorInfo}`` of one file, its header checked by the safetensors library.

    Raises CheckpointError naming the file for anything the library refuses (bad JSON,
    deep nesting, huge numbers, overlapping or out-of-file offsets, truncation) and for
    dtypes without a numpy equivalent.
    """
    path = Path(path)
    rank = tp_rank(path.name)
    try:
        with safe_open(str(path), framework="numpy") as f:
            described = {
                name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape()))
                for name in f.keys()  # noqa: SIM118 (safe_open has no __iter__)
            }
    except (SafetensorError, OSError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{path}: not a valid safetensors file: {err}") from None
    try:  # the header the library has just validated: its data offsets
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(_HEADER_LEN_BYTES), "little")
            header = json.loads(f.read(length))
    except (OSError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{path}: cannot read the header: {err}") from None
    data_start = _HEADER_LEN_BYTES + length
    infos = {}
    for name, (dtype_name, shape) in described.items():
        dtype = SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {dtype_name}, which this library does not "
                f"read; known: {', '.join(SAFETENSORS_DTYPES)}"
            )
        begin = header[name]["data_offsets"][0]
        infos[name] = TensorInfo(name, dtype, shape, path.name, data_start + begin, rank)
    return infos


class CheckpointFiles:
    """Every ``*.safetensors`` file of a directory, found by tensor name.

    Headers are read on construction (every file, whatever its number). A name held by
    files of whole tensors has one entry; a name held by TP files one entry per rank,
    ``0 .. tp_size-1``, in rank order. Data is read through ``view``.
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
        self._maps: dict[str, np.memmap] = {}
        self._lock = threading.Lock()
        found: dict[str, list[TensorInfo]] = {}
        for path in self.files:
            for name, info in read_header(path).items():
                found.setdefault(name, []).append(info)
        ranks = {rank for rank in map(tp_rank, self.file_names) if rank is not None}
        self.tp_size = max(ranks) + 1 if ranks else 0
        missing = sorted(set(range(self.tp_size)) - ranks)
        if missing:
            raise CheckpointError(
                f"{self.directory}: TP rank {missing[0]} is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + f": expected a file {tp_file_pattern(self.file_names, missing[0])} beside the "
                f"ranks {sorted(ranks)} that are there"
            )
        self._entries = {name: self._check(name, infos) for name, infos in sorted(found.items())}

    def _check(self, name: str, infos: list[TensorInfo]) -> tuple[TensorInfo, ...]:
        whole = [info for info in infos if info.rank is None]
        if len(whole) > 1:
            paths = ", ".join(info.file for info in whole)
            raise CheckpointError(f"{self.directory}: tensor {name!r} appears in {paths}")
        if whole and len(infos) > 1:
            paths = ", ".join(info.file for info in infos)
            raise CheckpointError(
                f"{self.directory}: tensor {name!r} is both whole and TP-sharded: {paths}"
            )
        if whole:
            return tuple(whole)
        sharded = sorted(infos, key=lambda info: info.rank)
        got = [info.rank for info in sharded]
        if got != list(range(self.tp_size)):
            rank = min(set(range(self.tp_size)) - set(got))
            raise CheckpointError(
                f"{self.directory}: tensor {name!r} has no slice in TP rank {rank} "
                f"({tp_file_pattern(self.file_names, rank)}); it is in ranks {got}"
            )
        first = sharded[0]
        for info in sharded[1:]:
            if info.dtype != first.dtype or len(info.shape) != len(first.shape):
                raise CheckpointError(
                    f"{self.directory}: TP slices of tensor {name!r} disagree: "
                    f"{first.file} has {first.safetensors_dtype}{list(first.shape)}, "
                    f"{info.file} has {info.safetensors_dtype}{list(info.shape)}"
                )
        return tuple(sharded)

    @property
    def file_names(self) -> tuple[str, ...]:
        """The files' names, sorted."""
        return tuple(path.name for path in self.files)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of all the files, headers included."""
        return sum(path.stat().st_size for path in self.files)

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

    def entry(self, name: str, rank: int | None) -> TensorInfo:
        """The whole tensor (its only entry) or the slice of TP rank ``rank``."""
        entries = self.entries(name)
        return entries[0] if entries[0].rank is None else entries[rank or 0]

    def view(self, info: TensorInfo) -> np.ndarray:
        """Tensor ``info`` as a read-only view of its mapped file; nothing is read until used.

        The file is mapped once; its size is checked against the header's (a file
        truncated after the header was read is a CheckpointError, not a crash).
        """
        path = self.directory / info.file
        with self._lock:
            mapped = self._maps.get(info.file)
            if mapped is None:
                try:
                    mapped = np.memmap(path, dtype=np.uint8, mode="r")
                except (OSError, ValueError) as err:
                    raise CheckpointError(f"{path}: cannot map: {err}") from None
                self._maps[info.file] = mapped
        if info.offset + info.nbytes > mapped.size:
            raise CheckpointError(
                f"{path}: tensor {info.name!r} ends at byte {info.offset + info.nbytes} "
                f"but the file has {mapped.size} bytes (truncated?)"
            )
        data = mapped[info.offset : info.offset + info.nbytes]
        return data.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        """Drop the file maps (views already handed out keep theirs alive)."""
        with self._lock:
            self._maps.clear()
