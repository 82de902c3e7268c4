"""``scripts/benchmark.py`` pieces that run in seconds: the long-prompt child (time to first
token, decode against the long cache, peak memory) on a tiny preset."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _benchmark():
    sys.path.insert(0, str(SCRIPTS))  # the script imports bench_shapes beside it
    try:
        spec = importlib.util.spec_from_file_location("benchmark", SCRIPTS / "benchmark.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


def test_long_prompt_child_times_prefill_and_decode():
    """Called directly (``main --child`` would pin this process's CPUs)."""
    bench = _benchmark()
    args = argparse.Namespace(
        shape="tiny-grok2",
        dtype="float32",
        long_prompt=600,  # past the tiny preset's 512 positions: the child widens them
        long_decode=4,
    )
    sys.path.insert(0, str(SCRIPTS))
    try:
        out = bench.long_child(args)
    finally:
        sys.path.remove(str(SCRIPTS))
    json.dumps(out)  # what the child prints
    assert out["tokens"] == 600
    assert out["ttft_s"] > 0 and out["ttft_s_compiled"] > 0
    assert out["decode_ms_per_token"] > 0
    assert out["peak_rss_bytes"] > 10 * 2**20
