"""The native library's host-side helpers for the checkpoint loader (``src/host.cc``), called
through ctypes from its copy threads: ctypes releases the GIL, so the threads run in parallel.

``copy_checked`` and ``dequantize_fp8`` return None where the library is unavailable
(``build.library``); the loader then keeps its numpy path.
"""

from __future__ import annotations

import ctypes
import sys
import threading

import ml_dtypes
import numpy as np

from grok.kernels.cpu.build import library

_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
_OUT = {np.dtype(np.float32): 0, np.dtype(ml_dtypes.bfloat16): 1}
_NO_BLOCK = sys.maxsize  # a block size that covers every row or column
_lock = threading.Lock()
_fns: dict[str, ctypes._CFuncPtr | None] = {}  # bound once
_i64, _ptr, _i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32
_SIGNATURES = {
    "grok_copy_checked": [_ptr, _i64, _ptr, _i64, _i64, _i64, _i32, ctypes.c_uint64],
    "grok_dequantize_fp8": [_ptr, _i64, _i64, _i64, _ptr, _i64, _i64, _i64, _i64, _i64, _ptr, _i64]
    + [_i32],
}


def _function(name: str):
    with _lock:
        if name not in _fns:
            lib = library()
            fn = None if lib is None else getattr(lib, name)
            if fn is not None:
                fn.argtypes = _SIGNATURES[name]
                fn.restype = _i64
            _fns[name] = fn
    return _fns[name]


def available() -> bool:
    """Whether the helpers run (the native library is built and loaded)."""
    return _function("grok_dequantize_fp8") is not None


def copy_checked(src: np.ndarray, dst: np.ndarray, threshold: int) -> int | None:
    """``dst[...] = src`` as raw bytes (equal dtypes and shapes, 1-D contiguous or 2-D views
    with contiguous rows), returning how many elements have their bits without the sign at
    or above ``threshold`` (``grok.checkpoint.finite.NON_FINITE_FROM``: not finite; 0: no
    check); None without the library (nothing copied)."""
    fn = _function("grok_copy_checked")
    if fn is None or src.dtype != dst.dtype or src.shape != dst.shape:
        return None
    if src.ndim == 1:
        if not (src.flags.c_contiguous and dst.flags.c_contiguous):
            return None
        src, dst = src.reshape(1, -1), dst.reshape(1, -1)
    if src.ndim != 2 or src.size == 0:
        return None if src.ndim != 2 else 0
    item = src.itemsize
    return int(
        fn(
            src.ctypes.data,
            _row_stride(src) * item,
            dst.ctypes.data,
            _row_stride(dst) * item,
            src.shape[0],
            src.shape[1] * item,
            item,
            threshold,
        )
    )


def _row_stride(a: np.ndarray) -> int:
    """Elements between the rows of a 2-D view whose rows are contiguous."""
    if a.ndim != 2 or (a.shape[1] > 1 and a.strides[1] != a.itemsize):
        raise ValueError(f"expected a 2-D view with contiguous rows, got strides {a.strides}")
    return a.strides[0] // a.itemsize if a.shape[0] > 1 else a.shape[1]


def dequantize_fp8(
    codes: np.ndarray,
    scale: np.ndarray,
    out: np.ndarray,
    *,
    row0: int = 0,
    col0: int = 0,
    blocks: tuple[int, int] | None = None,
) -> int | None:
    """``out[...] = codes * scales``: a float8_e4m3fn rectangle [R, C] (rows ``row0`` ..,
    columns ``col0`` .. of its tensor) times the tensor's ``scale`` (float32; per tensor (one
    value), per row ([rows of the tensor]), or ``blocks`` = (rows, cols) tiles [n_r, n_c]),
    into ``out`` [R, C] float32 or bfloat16 (nearest even). Views with contiguous rows.

    Returns how many values are not finite (NaN codes, overflow), or None without the library
    (nothing written).
    """
    fn = _function("grok_dequantize_fp8")
    if fn is None or codes.dtype != _E4M3 or out.dtype not in _OUT:
        return None
    if codes.shape != out.shape or codes.ndim != 2:
        raise ValueError(f"codes {codes.shape} and out {out.shape}: expected equal 2-D shapes")
    scale = np.ascontiguousarray(scale, np.float32)
    if blocks is not None:
        (block_rows, block_cols), stride = blocks, scale.reshape(scale.shape[0], -1).shape[1]
    elif scale.size == 1:
        block_rows, block_cols, stride = _NO_BLOCK, _NO_BLOCK, 0
    else:
        block_rows, block_cols, stride = 1, _NO_BLOCK, 1
    rows, cols = codes.shape
    if rows == 0 or cols == 0:
        return 0
    return int(
        fn(
            codes.ctypes.data,
            _row_stride(codes),
            rows,
            cols,
            scale.ctypes.data,
            stride,
            row0,
            col0,
            block_rows,
            block_cols,
            out.ctypes.data,
            _row_stride(out),
            _OUT[out.dtype],
        )
    )
