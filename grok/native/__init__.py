"""Native CPU kernels, built on first use: ``matvec`` (a matrix inside a stacked weight times
a few rows, or many), ``grouped_matvec`` (the MoE's ragged product) and ``attention`` (causal
grouped-query attention with Grok's capped, tempered logits).

XLA:CPU leaves gaps that no flag closes (``--xla_cpu_use_onednn``,
``--xla_cpu_experimental_{onednn,xnn,ynn}_fusion_type=dot`` and ``--xla_cpu_use_xnnpack``
measured the same, jaxlib 0.10.2): a weight inside a stacked ``[L, ...]`` array is copied out
before every dot that reads it, its few-row bfloat16 products run far below the memory
bandwidth (see ``kernels.cc`` for the figures), and attention's scores go through layout copies
and several elementwise passes. These read the matrices where they lie, at the bandwidth, and
keep a tile's scores in cache, through XLA FFI custom calls.

The kernels are C++ in ``kernels.cc``, compiled once per machine with the system's C++ compiler
(``$CXX`` or ``c++``, ``-O3 -march=native``) into ``$XDG_CACHE_HOME/grok/native`` (or
``$GROK_NATIVE_CACHE``), keyed by the source, the compiler, the jax version and the CPU.
Hand-written because no maintained package ships an XLA custom call for this; oneDNN and
XNNPACK are already inside XLA and measured no better. Without a compiler, without AVX-512,
on other backends, or with ``GROK_NATIVE=0`` in the environment, ``available`` says False and
the library uses XLA's path as before.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from grok.compile_cache import user_cache_root

TARGET = "grok_matvec"
GROUPED_TARGET = "grok_grouped_matvec"
ATTENTION_TARGET = "grok_attention"
MAX_ROWS = 8  # one pass over the weights serves up to 8 rows; decode batches above fall back
ENV_SWITCH = "GROK_NATIVE"  # "0" turns the kernels off
ENV_CACHE = "GROK_NATIVE_CACHE"  # where the built library goes (default: user cache)
_ISA_F32, _ISA_BF16 = 1, 2

_lock = threading.Lock()
_state: dict[str, object] = {}  # "isa": int, "lib": ctypes.CDLL, "why": str


def _source() -> bytes:
    return resources.files(__package__).joinpath("kernels.cc").read_bytes()


def _cpu_id() -> str:
    """The CPU's model and feature flags (a library built with -march=native runs only there)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return ""


def _build() -> tuple[int, ctypes.CDLL | None, str]:
    """Compiles (or finds) the library and loads it: (isa bits, library, why not)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return 0, None, f"{ENV_SWITCH}=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return 0, None, f"no kernels for {platform.machine()}"
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx) is None:
        return 0, None, f"no C++ compiler ({cxx!r} not found)"
    include = jax.ffi.include_dir()
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{include}"]
    source = _source()
    key = hashlib.sha256(
        b"\0".join(
            s.encode() if isinstance(s, str) else s
            for s in (
                source,
                " ".join(flags[:-1]),
                _compiler_version(cxx),
                jax.__version__,
                _cpu_id(),
            )
        )
    ).hexdigest()[:16]
    directory = Path(os.environ.get(ENV_CACHE) or user_cache_root() / "native")
    lib_path = directory / f"libgrok_native-{key}.so"
    if not lib_path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            src, out = Path(tmp) / "kernels.cc", Path(tmp) / "lib.so"
            src.write_bytes(source)
            try:
                done = subprocess.run(
                    [cxx, *flags, str(src), "-o", str(out)],
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
            except (OSError, subprocess.SubprocessError) as e:
                return 0, None, f"{cxx} failed: {e}"
            if done.returncode != 0:
                tail = done.stderr.strip().splitlines()[-3:]
                return 0, None, f"{cxx} failed: {' / '.join(tail)}"
            os.replace(out, lib_path)  # atomic: a concurrent build writes the same bytes
    lib = ctypes.CDLL(str(lib_path))
    isa = int(lib.grok_native_isa())
    if not isa:
        return 0, None, "the CPU has no AVX-512"
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.GrokMatvec), platform="cpu")
    jax.ffi.register_ffi_target(
        GROUPED_TARGET, jax.ffi.pycapsule(lib.GrokGroupedMatvec), platform="cpu"
    )
    jax.ffi.register_ffi_target(
        ATTENTION_TARGET, jax.ffi.pycapsule(lib.GrokAttention), platform="cpu"
    )
    return isa, lib, ""


def _load() -> int:
    with _lock:
        if "isa" not in _state:
            try:
                isa, lib, why = _build()
            # The kernels are optional: an unwritable cache, a library that will not load, a
            # jax without ``jax.ffi`` (before 0.4.38) all leave XLA's path, with the reason.
            except (OSError, AttributeError, RuntimeError, ValueError) as e:
                isa, lib, why = 0, None, f"{type(e).__name__}: {e}"
            _state.update(isa=isa, lib=lib, why=why)
            if why and os.environ.get(ENV_SWITCH, "1") != "0":
                warnings.warn(
                    f"grok.native: kernels unavailable ({why}); using XLA's dot", stacklevel=3
                )
    return int(_state["isa"])


def why_unavailable() -> str:
    """Why the kernels are off ("" when they are on)."""
    _load()
    return str(_state["why"])


def available(dtype: jnp.dtype) -> bool:
    """Whether the kernels run for ``dtype`` (float32, or bfloat16 on CPUs with AVX512-BF16)
    on the default backend. The first call may compile the kernel (a few seconds, once)."""
    if jax.default_backend() != "cpu":
        return False
    dtype = jnp.dtype(dtype)
    need = {jnp.dtype(jnp.float32): _ISA_F32, jnp.dtype(jnp.bfloat16): _ISA_BF16}.get(dtype)
    return need is not None and bool(_load() & need)


def _call(x: jax.Array, w: jax.Array, index: jax.Array) -> jax.Array:
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[-2]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(x, w, index)


def take(w: jax.Array, index) -> jax.Array:
    """``w[index]``: the leading axes of ``w`` picked by int32 scalars (a tuple, or an [n]
    array), taken as ``lax.dynamic_slice`` and the kernels take them (a negative index counts
    from the end, then it is clamped into range)."""
    lead = len(index)
    starts = [jnp.asarray(index[k], jnp.int32) for k in range(lead)] + [0] * (w.ndim - lead)
    return jax.lax.dynamic_slice(w, starts, (1,) * lead + w.shape[lead:]).reshape(w.shape[lead:])


def _put_zeros(w: jax.Array, index: jax.Array, part: jax.Array) -> jax.Array:
    """Zeros shaped like ``w`` with ``part`` at ``w[index]`` (a gradient of ``take``)."""
    lead = index.shape[0]
    starts = [index[k] for k in range(lead)] + [0] * (w.ndim - lead)
    part = part.reshape((1,) * lead + part.shape)
    return jax.lax.dynamic_update_slice(jnp.zeros_like(w), part, starts)


@jax.custom_vjp
def _matvec(x: jax.Array, w: jax.Array, index: jax.Array) -> jax.Array:
    # bfloat16 goes in as is (the kernel also takes its uint16 bits): a bitcast here became a
    # copy of the whole stacked operand inside the layer loop.
    return _call(x, w, index)


def _matvec_fwd(x, w, index):
    return _matvec(x, w, index), (x, w, index)


def _matvec_bwd(res, g):  # g [R, O] float32
    x, w, index = res
    m = take(w, index)  # [O, I]
    dx = jnp.einsum("RO,OI->RI", g, m.astype(jnp.float32)).astype(x.dtype)
    dm = jnp.einsum("RO,RI->OI", g, x.astype(jnp.float32)).astype(w.dtype)
    return dx, _put_zeros(w, index, dm), None


_matvec.defvjp(_matvec_fwd, _matvec_bwd)


def _check(kernel: str, **operands: jax.Array) -> None:
    """ValueError unless the operands share a dtype with a kernel here (uint16: the bits of
    bfloat16); the first operand names the dtype the others must have."""
    (first, x), *others = operands.items()
    for name, o in others:
        if o.dtype != x.dtype:
            raise ValueError(f"{kernel}: {first} is {x.dtype} and {name} {o.dtype}")
    logical = jnp.bfloat16 if x.dtype == jnp.uint16 else x.dtype
    if not available(logical):
        raise ValueError(f"{kernel}: no kernel for {x.dtype} here ({why_unavailable() or 'dtype'})")


def _indices(index: tuple[jax.Array | int, ...]) -> jax.Array:
    if not index:
        return jnp.zeros((0,), jnp.int32)
    return jnp.stack([jnp.asarray(i, jnp.int32) for i in index])


def matvec(x: jax.Array, w: jax.Array, index: tuple[jax.Array | int, ...] = ()) -> jax.Array:
    """``x @ w[index]^T`` in float32, reading ``w[index]`` in place.

    Args:
      x: [R, I] activations, R <= ``MAX_ROWS`` for one pass (more rows take more passes).
      w: [*lead, O, I] weights of ``x``'s dtype (float32 or bfloat16; both may also be the
        uint16 bits of bfloat16).
      index: one int32 scalar per leading axis of ``w``, clamped into range like
        ``lax.dynamic_slice``.
    Returns:
      [R, O] float32. Raises ValueError where ``available(x.dtype)`` is False.
    """
    if x.ndim != 2 or w.ndim != 2 + len(index) or x.shape[1] != w.shape[-1]:
        raise ValueError(f"matvec: x {x.shape} and w {w.shape} with {len(index)} indices")
    _check("matvec", x=x, w=w)
    return _matvec(x, w, _indices(index))


def _group_of_rows(sizes: jax.Array, rows: int) -> jax.Array:
    """[A] the group of each row (G for rows past the sizes' total)."""
    return jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(rows), side="right").astype(jnp.int32)


@jax.custom_vjp
def _grouped(x: jax.Array, w: jax.Array, index: jax.Array, sizes: jax.Array) -> jax.Array:
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[-2]), jnp.float32)
    return jax.ffi.ffi_call(GROUPED_TARGET, out, vmap_method="sequential")(x, w, index, sizes)


def _grouped_fwd(x, w, index, sizes):
    return _grouped(x, w, index, sizes), (x, w, index, sizes)


def _grouped_bwd(res, g):  # g [A, O] float32; a reference-speed gradient (not a decode path)
    x, w, index, sizes = res
    groups = w.shape[-3]
    mats = take(w, index)  # [G, O, I]
    row_group = _group_of_rows(sizes, x.shape[0])  # [A]
    g = jnp.where((row_group < groups)[:, None], g, 0.0)
    row_mats = mats[jnp.minimum(row_group, groups - 1)].astype(jnp.float32)  # [A, O, I]
    dx = jnp.einsum("AO,AOI->AI", g, row_mats).astype(x.dtype)
    dm = jax.ops.segment_sum(
        jnp.einsum("AO,AI->AOI", g, x.astype(jnp.float32)), row_group, num_segments=groups
    ).astype(w.dtype)  # [G, O, I]
    return dx, _put_zeros(w, index, dm), None, None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def grouped_matvec(
    x: jax.Array, w: jax.Array, sizes: jax.Array, index: tuple[jax.Array | int, ...] = ()
) -> jax.Array:
    """Rows of ``x`` sorted by group, each times its group's matrix: a grouped (ragged)
    matrix product for a few rows, reading the matrices in place.

    Args:
      x: [A, I] rows: the first ``sizes[0]`` for group 0, the next ``sizes[1]`` for group 1...
      w: [*lead, G, O, I] of ``x``'s dtype; ``index`` picks the leading axes (clamped).
      sizes: [G] int32 rows per group; rows past their total come out 0.
    Returns:
      [A, O] float32: row a is ``x[a] @ w[index][group of a]^T``. A group with rows reads its
      matrix once (up to ``MAX_ROWS`` rows per pass), a group without rows not at all.
    """
    lead = len(index)
    if x.ndim != 2 or w.ndim != 3 + lead or x.shape[1] != w.shape[-1]:
        raise ValueError(f"grouped_matvec: x {x.shape} and w {w.shape} with {lead} indices")
    if sizes.shape != (w.shape[-3],):
        raise ValueError(f"grouped_matvec: sizes {sizes.shape} for {w.shape[-3]} groups")
    _check("grouped_matvec", x=x, w=w)
    return _grouped(x, w, _indices(index), sizes.astype(jnp.int32))


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    tau: jax.Array,
    positions: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    cap: float | None,
    index: tuple[jax.Array | int, ...] = (),
) -> jax.Array:
    """Causal grouped-query attention with capped, tempered logits, by the native kernel.

    For query row (b, t, k, g) the logits against keys j < min(positions[b, t] + 1,
    lengths[b], S) are ``cap * tanh(q . k_j * scale / cap) * tau[b, t]`` (no tanh when ``cap``
    is None), the probabilities their softmax rounded to ``v``'s dtype, the output their sum
    of values; a row that sees no key averages all S values (as a softmax over all-masked
    logits does). No gradient: ``grok.attention`` wraps it with the XLA path's.

    Args:
      q: [B, T, K, G, H] queries (RoPE applied); H even.
      k, v: [*lead, B, S, K, H] keys (RoPE applied) and values of ``q``'s dtype (uint16: the
        bits of bfloat16 ones, with ``q`` likewise), read in place at ``index`` (one int32
        per leading axis, clamped like ``lax.dynamic_slice``); key s sits at position s.
      tau: [B, T] float32 temperature per query.
      positions: [B, T] int32 query positions; lengths: [B] int32 valid keys per row.
    Returns:
      [B, T, K, G, H] in ``v``'s dtype.
    """
    b, t, kh, g, h = q.shape
    lead = len(index)
    kv = k.shape[lead:]  # [B, S, K, H]
    if k.shape != v.shape or len(kv) != 4 or (kv[0], kv[2], kv[3]) != (b, kh, h):
        raise ValueError(f"attention: q {q.shape} with k {k.shape}, v {v.shape}, {lead} indices")
    if h % 2:
        raise ValueError(f"attention: no kernel for an odd head dim {h}")
    _check("attention", q=q, k=k, v=v)
    out = jax.ShapeDtypeStruct(q.shape, v.dtype)
    return jax.ffi.ffi_call(ATTENTION_TARGET, out, vmap_method="sequential")(
        q,
        k,
        v,
        _indices(index),
        tau.astype(jnp.float32),
        positions.astype(jnp.int32),
        lengths.astype(jnp.int32),
        scale=np.float32(scale),
        cap=np.float32(cap or 0.0),
    )
