"""Each measurement in its own fresh process, pinned to the same CPUs, and the timing helpers.

A child is ``python -m <module> --child KIND ...``: it pins itself (``pin_threads``), measures,
and prints its figures as one JSON line, which ``run_child`` reads back with the machine's
1-minute load before and after it. The parent starts no engine (no JAX backend, no torch,
no llama.cpp): engines never share a process, and nothing one leaves behind (threads, caches,
memory) slows another.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# The repository (or site-packages) folder holding the ``grok`` package the parent runs: the
# children import the same one.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
ERROR_TAIL = 2000  # characters of a failed child's stderr kept in the figures


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now (for a server or coordinator the
    caller starts next)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Ends ``proc``: SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def pin_threads(threads: int) -> None:
    """Restricts this process to ``threads`` CPUs and tells OpenMP/MKL the same number."""
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


def median_s(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def child_env() -> dict[str, str]:
    """The environment of a child: this one, with the ``grok`` package's folder first on
    ``PYTHONPATH`` (so a checkout runs its own code, installed or not)."""
    path = [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))


def run_child(module: str, argv: Sequence[str], label: str) -> dict[str, Any]:
    """Runs ``python -m module *argv`` in a fresh process; its last stdout line as JSON plus
    the load around it and its wall time, or ``{"error": the tail of its stderr}``. Prints
    one line: ``label``, seconds, the load before and after."""
    cmd = [sys.executable, "-m", module, *argv]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    child = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), check=False)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()[0]
    lines = child.stdout.strip().splitlines()
    if child.returncode != 0 or not lines:  # a signal shows as a negative status
        tail = child.stderr.strip()[-ERROR_TAIL:] or "no output"
        figures = {"error": f"exit status {child.returncode}: {tail}"}
    else:
        figures = json.loads(lines[-1])
    figures.update(load_before=load_before, load_after=load_after, wall_s=wall)
    print(
        f"  {label:<18} {wall:6.1f} s  load {load_before:.1f} -> {load_after:.1f}"
        + ("  FAILED" if "error" in figures else ""),
        flush=True,
    )
    return figures
