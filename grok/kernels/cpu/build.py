"""The native CPU library: compiled once per machine, cached, loaded, its FFI targets registered.

The C++ sources in ``src/`` (``common.h``, shared by every kernel family, and one ``.cc`` per
family) are compiled together into one shared library with the system's C++ compiler (``$CXX``
or ``c++``, ``-O3 -march=native``) into ``$XDG_CACHE_HOME/grok/native`` (or
``$GROK_NATIVE_CACHE``), keyed by the sources, the flags, the compiler, the jax version and the
CPU. Hand-written because no maintained package ships an XLA custom call for these products;
oneDNN and XNNPACK are already inside XLA and measured no better.

Without a compiler, without AVX-512, on another architecture, or with ``GROK_NATIVE=0`` in the
environment, ``available`` says False (with the reason in ``why_unavailable``) and the library
runs XLA's path. A kernel family added later is one more source file and one more entry in
``TARGETS``.
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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp

from grok.compile_cache import user_cache_root

MATVEC_TARGET = "grok_matvec"
GROUPED_TARGET = "grok_grouped_matvec"
ATTENTION_TARGET = "grok_attention"
QUANT_MATVEC_TARGET = "grok_quant_matvec"
QUANT_GROUPED_TARGET = "grok_quant_grouped_matvec"
PAGED_ATTENTION_TARGET = "grok_paged_attention"
# The FFI targets and the library symbols of their handlers.
TARGETS = {
    MATVEC_TARGET: "GrokMatvec",
    GROUPED_TARGET: "GrokGroupedMatvec",
    ATTENTION_TARGET: "GrokAttention",
    QUANT_MATVEC_TARGET: "GrokQuantMatvec",
    QUANT_GROUPED_TARGET: "GrokQuantGroupedMatvec",
    PAGED_ATTENTION_TARGET: "GrokPagedAttention",
}
ENV_SWITCH = "GROK_NATIVE"  # "0" turns the kernels off
ENV_CACHE = "GROK_NATIVE_CACHE"  # where the built library goes (default: user cache)
SOURCE_DIR = "src"  # the C++ sources, inside this package
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_ISA_F32, _ISA_BF16, _ISA_CODES = 1, 2, 4  # grok_native_isa()'s bits (src/isa.cc)

_lock = threading.Lock()
_state: dict[str, object] = {}  # "isa": int, "lib": ctypes.CDLL, "why": str


def sources() -> dict[str, bytes]:
    """{file name: bytes} of every C++ source and header, sorted by name."""
    folder = resources.files(__package__).joinpath(SOURCE_DIR)
    files = [f for f in folder.iterdir() if f.name.endswith((".cc", ".h"))]
    return {f.name: f.read_bytes() for f in sorted(files, key=lambda f: f.name)}


def compile_commands(
    cxx: str, folder: Path, out: Path, flags: Sequence[str] = FLAGS
) -> tuple[list[list[str]], list[str]]:
    """The compiler calls that build the library ``out`` from the sources written to
    ``folder``: one per translation unit (every ``.cc`` there, to an object beside it), and
    the link."""
    include = [f"-I{jax.ffi.include_dir()}", f"-I{folder}"]
    unit_flags = [f for f in flags if f != "-shared"]
    units = sorted(folder.glob("*.cc"))
    objects = [str(u.with_suffix(".o")) for u in units]
    compiles = [
        [cxx, *unit_flags, *include, "-c", str(u), "-o", o]
        for u, o in zip(units, objects, strict=True)
    ]
    return compiles, [cxx, *flags, *objects, "-o", str(out)]


def _run(command: list[str]) -> str:
    """Runs a compiler call: "" on success, else why not."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{command[0]} failed: {e}"
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        return f"{command[0]} failed: {' / '.join(tail)}"
    return ""


def build_library(
    cxx: str, files: dict[str, bytes], lib_path: Path, flags: Sequence[str] = FLAGS
) -> str:
    """Builds the library at ``lib_path`` from ``files`` ({name: bytes}); "" on success, else
    why not. Each translation unit compiles in a process of its own, as many at once as the
    machine has cores (the FFI headers make each one seconds of work), then one link."""
    lib_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
        folder, out = Path(tmp) / SOURCE_DIR, Path(tmp) / "lib.so"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        compiles, link = compile_commands(cxx, folder, out, flags)
        with ThreadPoolExecutor(max(1, min(len(compiles), os.cpu_count() or 1))) as pool:
            why = next((w for w in pool.map(_run, compiles) if w), "") or _run(link)
        if why:
            return why
        os.replace(out, lib_path)  # atomic: a concurrent build writes the same bytes
    return ""


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


def _cache_key(cxx: str, files: dict[str, bytes]) -> str:
    parts = [name.encode() + b"\0" + data for name, data in files.items()]
    parts += [" ".join(FLAGS).encode(), _compiler_version(cxx).encode()]
    parts += [jax.__version__.encode(), _cpu_id().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _build() -> tuple[int, ctypes.CDLL | None, str]:
    """Compiles (or finds) the library and loads it: (isa bits, library, why not)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return 0, None, f"{ENV_SWITCH}=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return 0, None, f"no kernels for {platform.machine()}"
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx) is None:
        return 0, None, f"no C++ compiler ({cxx!r} not found)"
    files = sources()
    directory = Path(os.environ.get(ENV_CACHE) or user_cache_root() / "native")
    lib_path = directory / f"libgrok_native-{_cache_key(cxx, files)}.so"
    if not lib_path.exists():
        why = build_library(cxx, files, lib_path)
        if why:
            return 0, None, why
    lib = ctypes.CDLL(str(lib_path))
    isa = int(lib.grok_native_isa())
    if not isa:
        return 0, None, "the CPU has no AVX-512"
    for target, symbol in TARGETS.items():
        handler = jax.ffi.pycapsule(getattr(lib, symbol))
        jax.ffi.register_ffi_target(target, handler, platform="cpu")
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
                    f"grok.kernels.cpu: kernels unavailable ({why}); using XLA's path",
                    stacklevel=3,
                )
    return int(_state["isa"])


def library() -> ctypes.CDLL | None:
    """The loaded library (its plain C functions, ``host``), or None where it is unavailable."""
    _load()
    return _state["lib"]  # type: ignore[return-value]


def why_unavailable() -> str:
    """Why the kernels are off ("" when they are on)."""
    _load()
    return str(_state["why"])


def available(dtype: jnp.dtype) -> bool:
    """Whether this machine's CPU runs the kernels for ``dtype`` (float32, or bfloat16 on CPUs
    with AVX512-BF16). The first call may compile the library (a few seconds, once per machine).
    Which devices a program runs on is the selector's question (``grok.kernels.select``)."""
    dtype = jnp.dtype(dtype)
    need = {jnp.dtype(jnp.float32): _ISA_F32, jnp.dtype(jnp.bfloat16): _ISA_BF16}.get(dtype)
    return need is not None and bool(_load() & need)


def available_codes(dtype: jnp.dtype, codes: jnp.dtype) -> bool:
    """Whether this machine runs the kernels for weights stored as ``codes`` (float8_e4m3fn
    or int8, with float32 scales) times ``dtype`` activations: bfloat16 only, on CPUs with
    AVX512-BF16 and AVX512-VBMI (``src/quant.cc``)."""
    return (
        jnp.dtype(dtype) == jnp.bfloat16
        and jnp.dtype(codes) in (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.int8))
        and bool(_load() & _ISA_CODES)
    )
