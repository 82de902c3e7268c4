"""Compilation: JAX's persistent compilation cache, and a clock for the time spent compiling.

The first call of a jitted function with new shapes traces it, lowers it and compiles it; on
the CPU that is most of what a short command-line run waits for (about 2 s for the built-in
model against a few milliseconds of running). With the persistent cache on, the compiled
executables are written to disk and a later process loads them instead of compiling again.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import jax

# The JAX monitoring events that make up "compiling": tracing to a jaxpr, lowering to MLIR,
# XLA's compile, and (with the persistent cache) reading a compiled executable back.
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
    "/jax/compilation_cache/cache_retrieval_time_sec",
)


def user_cache_root() -> Path:
    """``$XDG_CACHE_HOME/grok``, or ``~/.cache/grok`` when XDG_CACHE_HOME is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "grok"


def default_cache_dir() -> Path:
    """``user_cache_root() / "jax"``: JAX's compiled executables."""
    return user_cache_root() / "jax"


def enable_compile_cache(path: str | os.PathLike[str] | None = None) -> Path:
    """Turns on JAX's persistent compilation cache in ``path`` (default ``default_cache_dir()``)
    for every executable, however quick to compile; returns the directory.

    Call it before the first compilation. Entries are keyed by the program, the jax/jaxlib
    versions and the device, so a stale entry is never used.
    """
    directory = Path(path) if path is not None else default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # JAX's defaults skip executables that compile in under a second, which is every
    # executable of a small model: cache them all.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


class _Totals:
    """Seconds of compile events per thread, summed by one process-wide listener."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.registered = False
        self.lock = threading.Lock()

    def listen(self, event: str, seconds: float, **_kwargs) -> None:
        if event in COMPILE_EVENTS:
            self.local.seconds = getattr(self.local, "seconds", 0.0) + seconds

    def seconds(self) -> float:
        with self.lock:
            if not self.registered:
                jax.monitoring.register_event_duration_secs_listener(self.listen)
                self.registered = True
        return getattr(self.local, "seconds", 0.0)


_TOTALS = _Totals()


class CompileClock:
    """Seconds this thread spends tracing, lowering and compiling (or loading compiled
    executables) from its creation to ``stop()``; also a context manager.

        clock = CompileClock()
        ...  # calls of jitted functions
        clock.stop()  # -> seconds, also kept in clock.seconds
    """

    def __init__(self) -> None:
        self._start = _TOTALS.seconds()
        self.seconds = 0.0

    def stop(self) -> float:
        self.seconds = _TOTALS.seconds() - self._start
        return self.seconds

    def __enter__(self) -> CompileClock:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["COMPILE_EVENTS", "CompileClock", "default_cache_dir", "enable_compile_cache"]
