"""Tests of grok.safetensors_io: the raw-format reader and writer, the directory index and FP8."""

from __future__ import annotations

import json
import math
import os
import struct
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from grok.errors import CheckpointError
from grok.safetensors_io import (
    E4M3_MAX,
    SAFETENSORS_DTYPES,
    CheckpointIndex,
    SafetensorsFile,
    dequantize_fp8,
    dtype_from_safetensors,
    dtype_to_safetensors,
    index_directory,
    quantize_fp8_blockwise,
    quantize_fp8_per_channel,
    read_header,
    read_weight,
    save_file,
    tp_rank,
)

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)


def _random(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Random finite values of ``dtype``."""
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(shape) * 4).astype(dtype)


def _random_fp8(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Every finite e4m3 bit pattern is possible (0x7f / 0xff are NaN and left out)."""
    bits = rng.integers(0, 256, shape, dtype=np.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x3C
    return bits.view(FP8)


def _all_dtypes(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One tensor of every dtype, plus a scalar and an empty one."""
    tensors = {
        f"t.{name.lower()}": _random(rng, dtype, (3, 5))
        for name, dtype in SAFETENSORS_DTYPES.items()
    }
    tensors["scalar"] = np.array(2.5, np.float32)
    tensors["empty"] = np.zeros((4, 0), ml_dtypes.bfloat16)
    return tensors


def _write_raw(path: Path, header: object, data: bytes, *, pad: bool = True) -> Path:
    """A file with exactly this header (object or raw bytes) and data, for damage tests."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# ------------------------------------------------------------------------------------------
# dtypes and round trips


def test_dtype_table_round_trips_and_rejects_unknown():
    for name, dtype in SAFETENSORS_DTYPES.items():
        assert dtype_from_safetensors(name) == dtype
        assert dtype_to_safetensors(dtype) == name
    assert dtype_to_safetensors(ml_dtypes.bfloat16) == "BF16"
    assert dtype_to_safetensors(ml_dtypes.float8_e4m3fn) == "F8_E4M3"
    assert dtype_to_safetensors(ml_dtypes.float8_e5m2) == "F8_E5M2"
    assert dtype_to_safetensors(np.dtype(">f4")) == "F32"
    with pytest.raises(CheckpointError, match="F7"):
        dtype_from_safetensors("F7")
    with pytest.raises(CheckpointError, match="complex64"):
        dtype_to_safetensors(np.complex64)


def test_round_trip_every_dtype(tmp_path):
    tensors = _all_dtypes(np.random.default_rng(0))
    path = tmp_path / "all.safetensors"
    save_file(path, tensors, metadata={"format": "np", "note": "é"})
    with SafetensorsFile(path) as f:
        assert set(f.names) == set(tensors)
        assert f.metadata == {"format": "np", "note": "é"}
        for name, expected in tensors.items():
            got = f.get(name)
            info = f.info(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert got.tobytes() == expected.tobytes()
            assert info.shape == expected.shape and info.nbytes == expected.nbytes
            assert info.path == path and info.rank is None
            assert info.safetensors_dtype == dtype_to_safetensors(expected.dtype)


def test_big_endian_input_is_written_little_endian(tmp_path):
    values = np.arange(6, dtype=">i4").reshape(2, 3)
    save_file(tmp_path / "be.safetensors", {"x": values})
    with SafetensorsFile(tmp_path / "be.safetensors") as f:
        np.testing.assert_array_equal(f.get("x"), values)
        assert f.get("x").dtype == np.dtype("<i4")


def test_header_is_compact_json_padded_to_8_with_spaces(tmp_path):
    path = tmp_path / "p.safetensors"
    save_file(path, {"a": np.zeros(3, np.int8)})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + n]
    assert (8 + n) % 8 == 0
    assert header == b'{"a":{"dtype":"I8","shape":[3],"data_offsets":[0,3]}}'.ljust(n, b" ")
    assert len(raw) == 8 + n + 3


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}])
def test_bytes_equal_the_safetensors_package(tmp_path, metadata):
    """Same tensors, same bytes (metadata with at most one key: the package orders by hash)."""
    tensors = _all_dtypes(np.random.default_rng(1))
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save_file(ours, tensors, metadata=metadata)
    safetensors.numpy.save_file(tensors, theirs, metadata=metadata)
    assert ours.read_bytes() == theirs.read_bytes()


def test_each_reads_the_others_file(tmp_path):
    rng = np.random.default_rng(2)
    tensors = _all_dtypes(rng)
    metadata = {"b": "2", "a": "1", "c": "3"}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save_file(ours, tensors, metadata=metadata)
    safetensors.numpy.save_file(tensors, theirs, metadata=metadata)

    # The package parses our header (its own checks) and reads every dtype it knows.
    with safetensors.safe_open(ours, framework="np") as f:
        assert set(f.keys()) == set(tensors)
        assert f.metadata() == metadata
        for name, expected in tensors.items():
            if expected.dtype in (FP8, np.dtype(ml_dtypes.float8_e5m2)):
                assert list(f.get_slice(name).get_shape()) == list(expected.shape)
            else:
                np.testing.assert_array_equal(f.get_tensor(name), expected)
    # We read the package's file, float8 included (which its numpy reader cannot).
    with SafetensorsFile(theirs) as f:
        assert f.metadata == metadata
        for name, expected in tensors.items():
            assert f.get(name).tobytes() == expected.tobytes()
            assert f.get(name).dtype == expected.dtype


# ------------------------------------------------------------------------------------------
# memmap views and slices


def test_get_is_a_read_only_memmap_view_that_reads_nothing(tmp_path):
    path = tmp_path / "big.safetensors"
    big = np.arange(1 << 20, dtype=np.float32).reshape(1024, 1024)  # 4 MiB
    save_file(path, {"big": big, "small": np.ones(2, np.float16)})
    with SafetensorsFile(path) as f:
        tracemalloc.start()
        view = f.get("big")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 64 * 1024  # a view, not a 4 MiB copy
        assert isinstance(view, np.memmap)
        assert not view.flags.owndata and not view.flags.writeable
        with pytest.raises(ValueError):
            view[0, 0] = 1.0
        np.testing.assert_array_equal(view, big)
        # Both tensors are views of one mapping of the whole file, not copies.
        root = _root(view)
        assert isinstance(root, np.memmap) and root.nbytes == path.stat().st_size
        assert _root(f.get("small")) is root
        assert np.shares_memory(view, root)
    np.testing.assert_array_equal(view[3], big[3])  # still valid after close


def _root(array: np.ndarray) -> np.ndarray:
    """The first array of a chain of views."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


INDICES = [
    np.s_[2:5],
    np.s_[3],
    np.s_[-1],
    np.s_[:, 1:4],
    np.s_[..., 2],
    np.s_[::-1],
    np.s_[1:7:2, ::3],
    np.s_[1, None, 0:2],
    np.s_[3:3],
    np.s_[2, 1, 0],
    np.s_[()],
]


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F8_E4M3", "I64"])
@pytest.mark.parametrize("index", INDICES, ids=repr)
def test_get_slice_equals_slice_of_full_read(tmp_path, dtype, index):
    rng = np.random.default_rng(3)
    dt = SAFETENSORS_DTYPES[dtype]
    value = _random_fp8(rng, (8, 6, 4)) if dt == FP8 else _random(rng, dt, (8, 6, 4))
    path = tmp_path / "s.safetensors"
    save_file(path, {"pad": np.zeros(3, np.uint8), "w": value})
    with SafetensorsFile(path) as f:
        got = f.get_slice("w", index)
        expected = value[index]
        assert got.shape == expected.shape and got.dtype == expected.dtype
        assert got.tobytes() == np.ascontiguousarray(expected).tobytes()
        assert got.flags.owndata and got.flags.c_contiguous  # a copy of its own


def test_row_range_is_one_read_of_exactly_its_bytes(tmp_path, monkeypatch):
    path = tmp_path / "rows.safetensors"
    w = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    save_file(path, {"a": np.zeros(5, np.float64), "w": w})
    reads: list[tuple[int, int]] = []
    real_preadv = os.preadv

    def recording_preadv(fd, buffers, offset):
        reads.append((offset, sum(len(b) for b in buffers)))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", recording_preadv)
    with SafetensorsFile(path) as f:
        info = f.info("w")
        part = f.get_slice("w", np.s_[10:14])
    np.testing.assert_array_equal(part, w[10:14])
    row_bytes = 32 * 4
    assert reads == [(info.offset + 10 * row_bytes, 4 * row_bytes)]


def test_get_slice_rejects_advanced_and_out_of_range_indices(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(path, {"w": np.zeros((4, 3), np.float32)})
    with SafetensorsFile(path) as f:
        with pytest.raises(CheckpointError, match=r"'w'.*basic index"):
            f.get_slice("w", [0, 2])
        with pytest.raises(CheckpointError, match=r"'w'.*basic index"):
            f.get_slice("w", np.s_[True])
        with pytest.raises(CheckpointError, match=r"x\.safetensors.*'w'.*\(4, 3\)"):
            f.get_slice("w", np.s_[7])


def test_missing_tensor_and_closed_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(path, {"w": np.zeros(2, np.float32)})
    f = SafetensorsFile(path)
    assert "w" in f and "v" not in f and len(f) == 1
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*no tensor 'v'"):
        f.get("v")
    f.close()
    with pytest.raises(CheckpointError, match="closed"):
        f.get("w")
    with pytest.raises(CheckpointError, match="cannot open"):
        SafetensorsFile(tmp_path / "absent.safetensors")


# ------------------------------------------------------------------------------------------
# damaged files


def _good_file(path: Path) -> Path:
    save_file(path, {"a": np.arange(4, dtype=np.float32), "b": np.ones((2, 2), np.int16)})
    return path


def _flip_header_length(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[0:8] = struct.pack("<Q", len(raw))  # one header longer than the whole file
    path.write_bytes(bytes(raw))


def _garbage_json(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[8:14] = b"{oops:"
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:-3])


DAMAGES = {
    "shorter than 8 bytes": (lambda p: p.write_bytes(b"\x01\x02\x03"), "fewer than the 8-byte"),
    "header length past the end": (_flip_header_length, "only .* follow it"),
    "header length absurd": (
        lambda p: p.write_bytes(struct.pack("<Q", 1 << 62) + b"{}"),
        "more than the",
    ),
    "garbage JSON": (_garbage_json, "not valid UTF-8 JSON"),
    "truncated data": (_truncate, r"tensor 'b'.*truncated"),  # b (I16) is laid out last
    "header not an object": (lambda p: _write_raw(p, [1, 2], b""), "must be a JSON object"),
    "header not UTF-8": (lambda p: _write_raw(p, b'{"\xff":1}', b""), "not valid UTF-8"),
    "entry missing dtype": (
        lambda p: _write_raw(p, {"a": {"shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
        r"'a'.*lacks dtype",
    ),
    "entry missing shape and offsets": (
        lambda p: _write_raw(p, {"a": {"dtype": "F32"}}, b""),
        r"'a'.*lacks shape, data_offsets",
    ),
    "entry not an object": (lambda p: _write_raw(p, {"a": 3}, b""), "must be an object"),
    "unknown dtype": (
        lambda p: _write_raw(p, {"a": _entry("F7", [1], 0, 1)}, bytes(1)),
        r"'a'.*unknown dtype 'F7'",
    ),
    "bad shape": (
        lambda p: _write_raw(p, {"a": _entry("U8", [-1], 0, 0)}, b""),
        "non-negative ints",
    ),
    "offsets not matching shape": (
        lambda p: _write_raw(p, {"a": _entry("F32", [2, 3], 0, 20)}, bytes(24)),
        r"'a'.*span 20 bytes.*needs 24",
    ),
    "offsets reversed": (
        lambda p: _write_raw(p, {"a": _entry("U8", [0], 4, 0)}, bytes(4)),
        "begin <= end",
    ),
    "offsets not two ints": (
        lambda p: _write_raw(p, {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0]}}, b"x"),
        "data_offsets must be",
    ),
    "overlapping data": (
        lambda p: _write_raw(
            p, {"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, bytes(12)
        ),
        r"'a' and 'b' overlap",
    ),
    "data past the end": (
        lambda p: _write_raw(p, {"a": _entry("F64", [4], 0, 32)}, bytes(16)),
        r"'a'.*ends at byte .* has .* bytes \(truncated\)",
    ),
    "duplicate name": (
        lambda p: _write_raw(
            p,
            b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
            b'"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}',
            bytes(2),
        ),
        "names 'a' twice",
    ),
    "metadata not strings": (
        lambda p: _write_raw(p, {"__metadata__": {"k": 1}}, b""),
        "__metadata__ must be",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES), ids=list(DAMAGES))
def test_damaged_file_raises_checkpoint_error_naming_it(tmp_path, damage):
    apply, message = DAMAGES[damage]
    path = _good_file(tmp_path / "damaged.safetensors")
    SafetensorsFile(path).close()  # intact before the damage
    apply(path)
    with pytest.raises(CheckpointError, match=message) as err:
        SafetensorsFile(path)
    assert "damaged.safetensors" in str(err.value)
    with pytest.raises(CheckpointError):
        read_header(path)


def test_reader_accepts_zero_sized_tensors_sharing_an_offset(tmp_path):
    path = _write_raw(
        tmp_path / "z.safetensors",
        {"e": _entry("F32", [0, 3], 0, 0), "a": _entry("F32", [1], 0, 4)},
        bytes(4),
    )
    with SafetensorsFile(path) as f:
        assert f.get("e").shape == (0, 3)
        assert f.get("a").shape == (1,)


# ------------------------------------------------------------------------------------------
# writer errors and atomicity


def test_writer_rejects_bad_input(tmp_path):
    path = tmp_path / "w.safetensors"
    with pytest.raises(CheckpointError, match=r"'c'.*complex64"):
        save_file(path, {"c": np.zeros(2, np.complex64)})
    with pytest.raises(CheckpointError, match="__metadata__"):
        save_file(path, {"__metadata__": np.zeros(1, np.uint8)})
    with pytest.raises(CheckpointError, match="metadata must map strings"):
        save_file(path, {"a": np.zeros(1, np.uint8)}, metadata={"n": 1})
    assert not path.exists()


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_file(path, {"old": np.arange(3, dtype=np.int32)})
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_file(path, {"new": np.arange(5, dtype=np.int64)})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


# ------------------------------------------------------------------------------------------
# FP8


def _reference_dequant(q: np.ndarray, scale: np.ndarray, block: int | None) -> np.ndarray:
    """Element by element: W[i, j] = float(q[i, j]) * the scale that covers (i, j)."""
    qf = q.astype(np.float64)
    if block is None:
        s = scale.astype(np.float64)
        return (qf * (s.reshape(-1, 1) if s.size > 1 else s.reshape(()))).astype(np.float32)
    rows = np.arange(q.shape[0])[:, None] // block
    cols = np.arange(q.shape[1])[None, :] // block
    return (qf * scale.astype(np.float64)[rows, cols]).astype(np.float32)


@pytest.mark.parametrize("scale_shape", ["tensor", "tensor1", "channel", "channel1"])
def test_dequantize_scale_conventions(scale_shape):
    rng = np.random.default_rng(4)
    q = _random_fp8(rng, (6, 10))
    per_channel = rng.uniform(0.01, 2.0, 6).astype(np.float32)
    scale = {
        "tensor": np.float32(0.37),
        "tensor1": np.array([0.37], np.float32),
        "channel": per_channel,
        "channel1": per_channel[:, None],
    }[scale_shape]
    got = dequantize_fp8(q, scale, kind="scale")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _reference_dequant(q, np.asarray(scale), None), rtol=1e-6)


@pytest.mark.parametrize("shape", [(300, 200), (128, 256), (5, 130), (1, 1)])
def test_dequantize_blockwise_with_ragged_edges(shape):
    rng = np.random.default_rng(5)
    q = _random_fp8(rng, shape)
    scale_inv = rng.uniform(0.01, 2.0, (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)))
    scale_inv = scale_inv.astype(np.float32)
    got = dequantize_fp8(q, scale_inv, kind="scale_inv")
    np.testing.assert_allclose(got, _reference_dequant(q, scale_inv, 128), rtol=1e-6)
    as_bf16 = dequantize_fp8(q, scale_inv, kind="scale_inv", dtype=ml_dtypes.bfloat16)
    assert as_bf16.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(as_bf16, got.astype(ml_dtypes.bfloat16))


def test_dequantize_small_blocks_over_many_chunks(monkeypatch):
    """Row chunking must not shift the block grid: 8-row blocks, 24-row chunks."""
    import grok.safetensors_io as sio

    monkeypatch.setattr(sio, "_CHUNK_ELEMENTS", 24 * 20)
    rng = np.random.default_rng(6)
    q = _random_fp8(rng, (61, 20))
    scale_inv = rng.uniform(0.5, 2.0, (8, 3)).astype(np.float32)
    got = dequantize_fp8(q, scale_inv, kind="scale_inv", block=8)
    np.testing.assert_allclose(got, _reference_dequant(q, scale_inv, 8), rtol=1e-6)
    per_channel = rng.uniform(0.5, 2.0, 61).astype(np.float32)
    got = dequantize_fp8(q, per_channel, kind="scale")
    np.testing.assert_allclose(got, _reference_dequant(q, per_channel, None), rtol=1e-6)


def test_dequantize_rejects_mismatched_scales():
    q = np.zeros((200, 130), FP8)
    with pytest.raises(CheckpointError, match=r"expected \[2, 2\]"):
        dequantize_fp8(q, np.ones((2, 1), np.float32), kind="scale_inv")
    with pytest.raises(CheckpointError, match=r"\[\] or \[200\] or \[200, 1\]"):
        dequantize_fp8(q, np.ones(130, np.float32), kind="scale")
    with pytest.raises(CheckpointError, match="float8"):
        dequantize_fp8(np.zeros((2, 2), np.float32), np.float32(1), kind="scale")
    with pytest.raises(CheckpointError, match="kind"):
        dequantize_fp8(q, np.float32(1), kind="blocks")  # type: ignore[arg-type]


def _max_fp8_error(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Rounding to e4m3 (3 mantissa bits) errs by at most 2^-4 relative (normal numbers),
    2^-10 times the scale (subnormals)."""
    return np.maximum(np.abs(w) * 2.0**-4, s * 2.0**-10) * (1 + 1e-6)


def test_quantize_per_channel():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((5, 37)).astype(np.float32) * np.array([[1], [100], [0], [1e-3], [7]])
    w = w.astype(np.float32)
    q, scale = quantize_fp8_per_channel(w)
    assert q.dtype == FP8 and q.shape == w.shape and scale.dtype == np.float32
    amax = np.abs(w).max(axis=1)
    np.testing.assert_allclose(scale[amax > 0], amax[amax > 0] / 448, rtol=1e-6)
    assert scale[2] == 1.0 and np.all(q[2].astype(np.float32) == 0)  # the zero row
    assert np.all(np.abs(q.astype(np.float32)).max(axis=1)[amax > 0] == E4M3_MAX)
    back = dequantize_fp8(q, scale, kind="scale")
    assert np.all(np.abs(back - w) <= _max_fp8_error(w, scale[:, None]))
    bf16_input = quantize_fp8_per_channel(w.astype(ml_dtypes.bfloat16))
    assert bf16_input[0].shape == w.shape
    with pytest.raises(CheckpointError, match="row 1"):
        quantize_fp8_per_channel(np.array([[1.0, 2.0], [np.inf, 0.0]], np.float32))


def test_quantize_blockwise_ragged_and_zero_blocks():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((300, 200)).astype(np.float32)
    w[128:256, 128:] = 0.0  # one all-zero (partial) tile
    q, scale_inv = quantize_fp8_blockwise(w)
    assert scale_inv.shape == (3, 2) and q.dtype == FP8
    for i in range(3):
        for j in range(2):
            tile = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            amax = np.abs(tile).max()
            assert scale_inv[i, j] == (np.float32(amax) / np.float32(448) if amax else 1.0)
    back = dequantize_fp8(q, scale_inv, kind="scale_inv")
    s_full = scale_inv[np.arange(300)[:, None] // 128, np.arange(200)[None, :] // 128]
    assert np.all(np.abs(back - w) <= _max_fp8_error(w, s_full))
    assert np.all(back[128:256, 128:] == 0)


def test_read_weight_from_a_file(tmp_path):
    rng = np.random.default_rng(9)
    w = rng.standard_normal((130, 70)).astype(np.float32)
    q_c, s_c = quantize_fp8_per_channel(w)
    q_b, s_b = quantize_fp8_blockwise(w)
    plain = w.astype(ml_dtypes.bfloat16)
    path = tmp_path / "fp8.safetensors"
    save_file(
        path,
        {
            "c.weight": q_c,
            "c.weight_scale": s_c[:, None],
            "b.weight": q_b,
            "b.weight_scale_inv": s_b,
            "p.weight": plain,
            "orphan.weight": q_c,
            "both.weight": q_c,
            "both.weight_scale": s_c,
            "both.weight_scale_inv": s_b,
        },
    )
    with SafetensorsFile(path) as f:
        got_c = read_weight(f, "c.weight")
        np.testing.assert_array_equal(got_c, dequantize_fp8(q_c, s_c, kind="scale"))
        assert got_c.dtype == np.float32
        got_b = read_weight(f, "b.weight", dtype=ml_dtypes.bfloat16)
        assert got_b.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(
            got_b, _reference_dequant(q_b, s_b, 128).astype(ml_dtypes.bfloat16)
        )
        stored = read_weight(f, "p.weight")
        assert isinstance(stored, np.memmap) and stored.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(stored, plain)
        np.testing.assert_array_equal(
            read_weight(f, "p.weight", dtype=np.float32), plain.astype(np.float32)
        )
        with pytest.raises(CheckpointError, match=r"'orphan\.weight'.*no orphan\.weight_scale"):
            read_weight(f, "orphan.weight")
        with pytest.raises(CheckpointError, match="both _scale and _scale_inv"):
            read_weight(f, "both.weight")


# ------------------------------------------------------------------------------------------
# directory index and TP files


@pytest.mark.parametrize(
    ("name", "rank"),
    [
        ("pytorch_model-00001-TP-common.safetensors", None),
        ("pytorch_model-00007-TP-000.safetensors", 0),
        ("pytorch_model-00039-TP-007.safetensors", 7),
        ("model-00001-of-00002.safetensors", None),
        ("model.safetensors", None),
    ],
)
def test_tp_rank_from_file_name(name, rank):
    assert tp_rank(name) == rank


def _write_release(directory: Path, rng: np.random.Generator, tp: int = 4) -> dict:
    """A miniature of the Grok-2 layout: common files plus expert slices in TP files."""
    Fe, D = 16, 8
    full = {
        "w1": rng.standard_normal((Fe, D)).astype(ml_dtypes.bfloat16),
        "w2": rng.standard_normal((D, Fe)).astype(ml_dtypes.bfloat16),
        "embed": rng.standard_normal((32, D)).astype(ml_dtypes.bfloat16),
        "norm": rng.standard_normal(D).astype(ml_dtypes.bfloat16),
    }
    prefix = "model.layers.0.block_sparse_moe.experts.0"
    # File numbers deliberately out of step with content: the index must read headers.
    save_file(
        directory / "pytorch_model-00009-TP-common.safetensors",
        {"model.embed_tokens.weight": full["embed"]},
    )
    save_file(
        directory / "pytorch_model-00002-TP-common.safetensors", {"model.norm.weight": full["norm"]}
    )
    rows = Fe // tp
    for r in range(tp):
        save_file(
            directory / f"pytorch_model-{20 - r:05d}-TP-{r:03d}.safetensors",
            {
                f"{prefix}.w1.weight": full["w1"][r * rows : (r + 1) * rows],
                f"{prefix}.w2.weight": full["w2"][:, r * rows : (r + 1) * rows],
            },
        )
    return full


def test_index_directory_finds_common_and_tp_slices(tmp_path):
    full = _write_release(tmp_path, np.random.default_rng(10))
    (tmp_path / "config.json").write_text("{}")  # other files are ignored
    table = index_directory(tmp_path)
    prefix = "model.layers.0.block_sparse_moe.experts.0"
    assert set(table) == {
        "model.embed_tokens.weight",
        "model.norm.weight",
        f"{prefix}.w1.weight",
        f"{prefix}.w2.weight",
    }
    (norm,) = table["model.norm.weight"]
    assert norm.rank is None and norm.path.name == "pytorch_model-00002-TP-common.safetensors"
    w1 = table[f"{prefix}.w1.weight"]
    assert [info.rank for info in w1] == [0, 1, 2, 3]
    assert [info.path.name for info in w1] == [
        f"pytorch_model-{20 - r:05d}-TP-{r:03d}.safetensors" for r in range(4)
    ]
    assert all(info.shape == (4, 8) for info in w1)

    with CheckpointIndex(tmp_path) as index:
        assert index.tp_size == 4 and len(index) == 4
        assert index.is_sharded(f"{prefix}.w2.weight")
        assert not index.is_sharded("model.norm.weight")
        w1_full = np.concatenate([index.get(f"{prefix}.w1.weight", r) for r in range(4)], axis=0)
        w2_full = np.concatenate([index.get(f"{prefix}.w2.weight", r) for r in range(4)], axis=1)
        np.testing.assert_array_equal(w1_full, full["w1"])
        np.testing.assert_array_equal(w2_full, full["w2"])
        np.testing.assert_array_equal(index.get("model.embed_tokens.weight"), full["embed"])
        np.testing.assert_array_equal(
            index.get_slice("model.embed_tokens.weight", np.s_[5:9]), full["embed"][5:9]
        )
        with pytest.raises(CheckpointError, match=r"split over 4 TP files; pass rank"):
            index.get(f"{prefix}.w1.weight")
        with pytest.raises(CheckpointError, match="not TP-sharded"):
            index.get("model.norm.weight", rank=1)
        with pytest.raises(CheckpointError, match="no tensor 'lm_head.weight'"):
            index.get("lm_head.weight")


def test_index_rejects_duplicates_and_missing_ranks(tmp_path):
    one = np.zeros(2, np.float32)
    dup = tmp_path / "dup"
    dup.mkdir()
    save_file(dup / "a-00001-TP-common.safetensors", {"x": one})
    save_file(dup / "a-00002-TP-common.safetensors", {"x": one})
    with pytest.raises(CheckpointError, match=r"'x' appears in a-00001-TP-common.*a-00002"):
        index_directory(dup)

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    save_file(mixed / "a-00001-TP-common.safetensors", {"x": one})
    save_file(mixed / "a-00002-TP-000.safetensors", {"x": one})
    with pytest.raises(CheckpointError, match="both whole and TP-sharded"):
        index_directory(mixed)

    gap = tmp_path / "gap"
    gap.mkdir()
    save_file(gap / "a-00001-TP-000.safetensors", {"x": one})
    save_file(gap / "a-00002-TP-002.safetensors", {"x": one})
    with pytest.raises(CheckpointError, match=r"ranks \[0, 2\]"):
        index_directory(gap)

    partial = tmp_path / "partial"
    partial.mkdir()
    save_file(partial / "a-00001-TP-000.safetensors", {"x": one, "y": one})
    save_file(partial / "a-00002-TP-001.safetensors", {"x": one})
    with pytest.raises(CheckpointError, match=r"'y' is in TP ranks \[0\]"):
        index_directory(partial)

    clash = tmp_path / "clash"
    clash.mkdir()
    save_file(clash / "a-00001-TP-000.safetensors", {"x": one})
    save_file(clash / "a-00002-TP-001.safetensors", {"x": one.astype(np.float16)})
    with pytest.raises(CheckpointError, match="TP slices of tensor 'x' disagree"):
        index_directory(clash)

    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        index_directory(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        index_directory(tmp_path / "nowhere")


def test_read_weight_from_index_uses_each_ranks_own_scale(tmp_path):
    rng = np.random.default_rng(11)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    w[8:] *= 50.0  # the second rank's slice has a much larger range
    for r in range(2):
        q, s = quantize_fp8_per_channel(w[r * 8 : (r + 1) * 8])
        save_file(tmp_path / f"m-0000{r}-TP-00{r}.safetensors", {"w": q, "w_scale": s})
    save_file(tmp_path / "m-00009-TP-common.safetensors", {"norm": np.ones(8, np.float32)})
    with CheckpointIndex(tmp_path) as index:
        parts = [read_weight(index, "w", rank=r) for r in range(2)]
        np.testing.assert_array_equal(read_weight(index, "norm"), np.ones(8, np.float32))
    stitched = np.concatenate(parts, axis=0)
    assert np.all(np.abs(stitched - w) <= np.abs(w) * 2.0**-4 + 1e-6)


def test_columns_come_from_the_mapping_not_a_whole_tensor_read(tmp_path, monkeypatch):
    path = tmp_path / "cols.safetensors"
    w = np.arange(16 * 12, dtype=np.int32).reshape(16, 12)
    save_file(path, {"w": w})
    reads: list[int] = []
    real_preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, b, o: reads.append(o) or real_preadv(fd, b, o))
    with SafetensorsFile(path) as f:
        np.testing.assert_array_equal(f.get_slice("w", np.s_[:, 3:6]), w[:, 3:6])
    assert reads == []


def test_open_file_keeps_reading_what_it_opened_after_the_path_is_replaced(tmp_path):
    path = tmp_path / "r.safetensors"
    save_file(path, {"w": np.arange(4, dtype=np.float32)})
    with SafetensorsFile(path) as f:
        save_file(path, {"w": np.zeros(4, np.float32), "v": np.ones(9, np.float64)})
        np.testing.assert_array_equal(f.get("w"), np.arange(4, dtype=np.float32))
        np.testing.assert_array_equal(f.get_slice("w", np.s_[1:3]), [1.0, 2.0])
