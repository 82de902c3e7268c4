"""The persistent compilation cache: where it lives, and that a fresh process fills it.

The cache is process-wide JAX configuration, so it is turned on in a subprocess, never in
the test process.
"""

import os
import subprocess
import sys
from pathlib import Path

from grok.compile_cache import default_cache_dir

REPO = Path(__file__).resolve().parent.parent


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "grok" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "grok" / "jax"


def test_a_process_writes_its_executables_to_the_cache(tmp_path):
    code = (
        "import jax, jax.numpy as jnp\n"
        "from grok.compile_cache import enable_compile_cache\n"
        "enable_compile_cache()\n"
        "print(jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).sum())\n"
    )
    env = {
        **os.environ,
        "XDG_CACHE_HOME": str(tmp_path),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    entries = list((tmp_path / "grok" / "jax").iterdir())
    assert entries, "no executable was written to the cache"
