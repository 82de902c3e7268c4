"""One accelerator, one command: the tests that make sense there, then full-width Grok-2 layers
measured against the device's own copy bandwidth and matmul rate. JSON out.

    PYTHONPATH=. python scripts/device_check.py --out device.json      # a GPU/TPU, < 8 minutes
    PYTHONPATH=. python scripts/device_check.py --small --tests none   # CPU smoke run (the suite)

(``python -m grok.bench.device_check`` is the same program.)

Steps, each recorded in the JSON:

1. Tests: ``pytest`` on ``DEVICE_TEST_MODULES`` (the model against the float64 reference, the
   fast paths, the ragged MoE, generation, sampling) in a subprocess with float32 matmuls at
   full precision (``JAX_DEFAULT_MATMUL_PRECISION=highest``: accelerators otherwise use
   reduced-precision float32 matmuls, which the 1e-4 reference tolerances do not allow).
   Skipped with ``--tests none`` or when pytest is not installed.
   Then loading (``--no-load`` skips it): ``scripts/bench_load.py``'s bf16 checkpoint read
   onto this device, against a plain read of the same files (``measure_loading``).
2. Rooflines measured on this device: the copy bandwidth (``y = x + 1`` over a large bfloat16
   array: 2 * bytes / t) and the bfloat16 matmul rate ([n, n] x [n, n], float32
   accumulation: 2 n^3 / t).
3. N full-width Grok-2 decoder layers (D 8192, 64/8 heads of 128, dense MLP 32768, 8 experts of
   16384, top-2) with the embedding and head (V 131072), random weights made on the device
   (``grok.testing.random_params``: no host copy of a large one), N sized to the device's
   memory (``--layers`` to force), in bfloat16 and with
   ``quantize="fp8"`` (matrices in float8_e4m3fn with per-channel scales): prefill of 2048
   and 8192 tokens (batch 1) into a KV cache, and one decode step at batch 1, 8 and 64
   against a cache of 2048 filled slots. Each is timed (median of repeats after a compiling
   run) and reported as model FLOPs / t over the matmul rate and bytes moved / t over the
   copy bandwidth.
4. Last, one layer's experts at full width on the prefill lengths by both expert paths
   (``moe_ragged``, ``moe_blocks``): which one ``grok.moe.PREFILL_IMPL`` should pick here.

``grok.bench.device_costs`` holds the shapes, the rooflines and the count of FLOPs and bytes.
Steps 2-3 stop early past ``--budget-s`` and say so.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from grok.bench.device_costs import (
    FULL_SHAPES,
    SMALL_SHAPES,
    Shapes,
    attention_flops,
    copy_bandwidth,
    expected_experts,
    kv_bytes,
    layers_for_memory,
    matmul_rate,
    model_costs,
    nbytes,
    timed,
)
from grok.bench.harness import PACKAGE_ROOT as ROOT
from grok.kernels import devices_of, select
from grok.kv_cache import KVCache
from grok.layers import activation
from grok.memory_plan import device_bytes_limit
from grok.model import forward_fns
from grok.moe import EXPERT_IN_AXIS, moe_blocks, moe_ragged
from grok.rope import rope_table
from grok.testing import random_array, random_params

DEVICE_TEST_MODULES = (
    "tests/test_model.py",
    "tests/kernels/test_fast_paths.py",
    "tests/kernels/test_moe_ragged.py",
    "tests/test_generate.py",
    "tests/test_sampling.py",
)
TESTS_TIMEOUT_S = 180  # the test step's share of the 8 minutes
# JAX takes 75% of an accelerator's memory by default; the layers want more of it. Read when
# the backend starts, so each process (the tests' and this one) sets it before touching it.
MEM_FRACTION_ENV = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")
ROOFLINE_REPEATS = 10  # the copy and matmul kernels are short: more runs for a stable median
WEIGHT_STD = 0.02  # the expert paths' random weights (the model's: random_params' default)


# Step 1: tests.


def test_command(modules: Sequence[str]) -> list[str]:
    """The pytest command line of the test step."""
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *modules]


def run_tests(modules: Sequence[str]) -> dict[str, Any]:
    if not modules:
        return {"skipped": "--tests none"}
    if importlib.util.find_spec("pytest") is None:
        return {"skipped": "pytest is not installed (bring its wheel along, see the README)"}
    env = {
        **os.environ,
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            test_command(modules),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=TESTS_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-2000:]
        return {"modules": list(modules), "timed_out_s": TESTS_TIMEOUT_S, "tail": str(tail)}
    lines = proc.stdout.strip().splitlines()
    summary = lines[-1] if lines else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|error|skipped)", summary)}
    return {
        "modules": list(modules),
        "returncode": proc.returncode,
        "summary": summary,
        **counts,
        "seconds": round(time.perf_counter() - start, 1),
        "failures": [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:20],
    }


# Step 1b: loading.
LOAD_TIMEOUT_S = 240


def measure_loading(small: bool, skip: str | None) -> dict[str, Any]:
    """``scripts/bench_load.py`` on its bf16 checkpoint (1e9 parameters; ``--small``: 2e7),
    onto this device: GB/s against a plain read of the same page-cached files, and host
    memory above the arrays. The accelerator path (``HostBuffers``: reused host buffers,
    reads overlapping transfers) runs nowhere else. In a subprocess, before this process
    takes the device."""
    if skip:
        return {"skipped": skip}
    with tempfile.TemporaryDirectory(prefix="grok_device_load_") as tmp:
        out = Path(tmp) / "load.json"
        command = [sys.executable, str(ROOT / "scripts" / "bench_load.py"), "--kinds", "bf16"]
        command += ["--loads", "single", "--dir", str(Path(tmp) / "ckpt"), "--json", str(out)]
        try:
            proc = subprocess.run(
                command + (["--small"] if small else []),
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=LOAD_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            return {"timed_out_s": LOAD_TIMEOUT_S}
        if proc.returncode != 0:
            return {"returncode": proc.returncode, "tail": proc.stderr[-2000:]}
        return json.loads(out.read_text())


# Steps 2 and 3: the rooflines (grok.bench.device_costs), then the layers.


def measure_model(
    shapes: Shapes,
    quant: str | None,
    rates: dict[str, float],
    repeats: int,
    deadline: float,
) -> dict[str, Any]:
    """Prefill and decode timings of one weight format."""
    config = shapes.config
    dtype = jnp.dtype(jnp.bfloat16)
    costs = model_costs(config, quant)
    start = time.perf_counter()
    params = random_params(config, dtype=dtype, quant=quant)
    made_s = time.perf_counter() - start
    kernels = select(dtype, devices=devices_of(params), quant=quant)  # as grok.Model picks
    fns = forward_fns(config, dtype, "auto", quant, kernels=kernels)
    positions_needed = max(*shapes.prefill_lengths, shapes.decode_context + 1)
    rope = rope_table(config, positions_needed)
    weights = costs.expert_bytes + costs.embed_bytes + costs.other_bytes
    out: dict[str, Any] = {
        "quantize": quant,
        "param_bytes": nbytes(params),
        "make_weights_s": round(made_s, 2),
        "prefill": [],
        "decode": [],
    }

    def fractions(flops: float, nbytes: float, t: float) -> dict[str, float]:
        return {
            "seconds": t,
            "flops": flops,
            "bytes": nbytes,
            "of_matmul_rate": flops / t / rates["flops_per_s"],
            "of_copy_bandwidth": nbytes / t / rates["bytes_per_s"],
        }

    @functools.partial(jax.jit, static_argnames=("t",))
    def prefill(params, rope, tokens, t):
        cache = KVCache.create(config, 1, t, dtype)
        positions = jnp.arange(t, dtype=jnp.int32)[None]  # [1, T]
        lengths = jnp.full((1,), t, jnp.int32)
        return fns.apply(params, tokens, positions, rope, cache, lengths, lengths - 1)

    def prefill_case(t: int) -> dict[str, Any]:
        tokens = jax.random.randint(jax.random.key(t), (1, t), 0, config.vocab_size)
        first, secs = timed(lambda: prefill(params, rope, tokens, t), repeats)
        flops = 2.0 * t * costs.active_params + attention_flops(config, t, t) / 2
        flops += 2.0 * costs.head_params  # the head at the last position only
        nbytes = weights + kv_bytes(config, 1, t, dtype.itemsize)
        return {"first_call_s": first, **fractions(flops, nbytes, secs)}

    for t in shapes.prefill_lengths:
        out["prefill"].append({"tokens": t, **_case(prefill_case, t, deadline)})

    @functools.partial(jax.jit, donate_argnames=("cache",))
    def decode(params, rope, cache, tokens, positions):
        return fns.apply(params, tokens, positions, rope, cache, positions[:, 0] + 1)

    ctx = shapes.decode_context

    def decode_case(b: int) -> dict[str, Any]:
        cache = KVCache.create(config, b, ctx + 1, dtype)
        tokens = jax.random.randint(jax.random.key(b), (b, 1), 0, config.vocab_size)
        positions = jnp.full((b, 1), ctx, jnp.int32)
        state = {"cache": cache}

        def step(tokens=tokens, positions=positions, state=state):
            logits, state["cache"] = decode(params, rope, state["cache"], tokens, positions)
            return logits

        first, secs = timed(step, repeats)
        used = expected_experts(b, config.num_local_experts, config.num_experts_per_tok)
        nbytes = (
            costs.other_bytes
            + costs.expert_bytes * used / config.num_local_experts
            + costs.embed_bytes * b / config.vocab_size
            + kv_bytes(config, b, ctx + 1, dtype.itemsize)
        )
        flops = b * (2.0 * (costs.active_params + costs.head_params))
        flops += attention_flops(config, b, ctx + 1)
        return {
            "context": ctx,
            "tokens_per_s": b / secs,
            "expected_experts_per_layer": used,
            "first_call_s": first,
            **fractions(flops, nbytes, secs),
        }

    for b in shapes.decode_batches:
        out["decode"].append({"batch": b, **_case(decode_case, b, deadline)})
    return out


def _case(fn: Callable[[int], dict[str, Any]], size: int, deadline: float) -> dict[str, Any]:
    """One measurement; past the deadline it is skipped, and an error is recorded rather
    than raised, so an unattended run still reports everything else."""
    if time.perf_counter() > deadline:
        return {"skipped": "time budget (--budget-s)"}
    try:
        return fn(size)
    except Exception as e:  # out of memory, a lowering the backend lacks, ...
        return {"error": f"{type(e).__name__}: {str(e)[:500]}"}


def measure_moe_paths(
    shapes: Shapes, rates: dict[str, float], repeats: int, deadline: float
) -> list[dict[str, Any]]:
    """One layer's experts (bf16, uniform random top-k routing) on the prefill lengths by the
    grouped-matmul path and the block path: the data behind ``grok.moe.PREFILL_IMPL``."""
    c = shapes.config
    e, d, fe, k = c.num_local_experts, c.hidden_size, c.moe_intermediate_size, c.num_experts_per_tok
    key = jax.random.key(7)
    in_out = [(e, d, fe), (e, d, fe), (e, fe, d)]  # w1, w3, w2 as [E, In, Out]
    w1, w3, w2 = (
        random_array(shape, jnp.bfloat16, WEIGHT_STD, name=f"w{i}")
        for i, shape in enumerate(
            in_out if EXPERT_IN_AXIS == 1 else [(s[0], s[2], s[1]) for s in in_out]
        )
    )
    act = activation(c.hidden_act)
    paths = {"ragged": moe_ragged, "blocks": moe_blocks}

    def case(path: str, t: int) -> dict[str, Any]:
        x = jax.random.normal(jax.random.fold_in(key, t), (t, d), jnp.bfloat16)  # [T, D]
        logits = jax.random.normal(jax.random.fold_in(key, t + 1), (t, e))  # [T, E]
        weights, experts = jax.lax.top_k(jax.nn.softmax(logits), k)  # [T, k]
        run = jax.jit(lambda x, ws, ex: paths[path](x, ws, ex, w1, w3, w2, act))
        first, secs = timed(lambda: run(x, weights, experts), repeats)
        flops = 2.0 * t * k * 3 * d * fe
        return {
            "first_call_s": first,
            "seconds": secs,
            "of_matmul_rate": flops / secs / rates["flops_per_s"],
        }

    return [
        {"path": path, "tokens": t, **_case(functools.partial(case, path), t, deadline)}
        for t in shapes.prefill_lengths
        for path in paths
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="reduced widths (the CPU smoke run)")
    p.add_argument("--layers", type=int, default=None, help="N (default: sized to memory)")
    p.add_argument(
        "--tests",
        default="default",
        help="'default' (DEVICE_TEST_MODULES), 'none', or comma-separated test files",
    )
    p.add_argument("--quantize", default="none,fp8", help="weight formats: none and/or fp8")
    p.add_argument("--no-load", action="store_true", help="skip the loading benchmark")
    p.add_argument("--prefill", default=None, help="prompt lengths, e.g. 2048,8192")
    p.add_argument("--decode-batches", default=None, help="decode batch sizes, e.g. 1,8,64")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the compiling one")
    p.add_argument("--budget-s", type=float, default=400.0, help="stop measuring after this")
    p.add_argument("--out", default=None, help="write the JSON here too (it always goes to stdout)")
    return p.parse_args(argv)


def _ints(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    return default if text is None else tuple(int(v) for v in text.split(","))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    deadline = start + args.budget_s
    os.environ.setdefault(*MEM_FRACTION_ENV)
    modules = {"default": DEVICE_TEST_MODULES, "none": ()}.get(args.tests)
    if modules is None:
        modules = tuple(args.tests.split(","))
    tests = run_tests(modules)  # first: its process needs the device before this one holds it
    loading = measure_loading(args.small, "--no-load" if args.no_load else None)  # likewise

    base = SMALL_SHAPES if args.small else FULL_SHAPES
    shapes = dataclasses.replace(
        base,
        prefill_lengths=_ints(args.prefill, base.prefill_lengths),
        decode_batches=_ints(args.decode_batches, base.decode_batches),
    )
    device = jax.devices()[0]
    limit = device_bytes_limit(device)
    # The small run keeps 2 layers: its point is to run every step, not to fill the memory.
    layers = args.layers or (2 if args.small else layers_for_memory(shapes, limit, None))
    shapes = dataclasses.replace(shapes, config=shapes.config.replace(num_hidden_layers=layers))
    formats = [None if q == "none" else q for q in args.quantize.split(",")]

    report: dict[str, Any] = {
        "device": device.device_kind,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "bytes_limit": limit,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "small": args.small,
        "tests": tests,
        "loading": loading,
    }
    repeats = max(args.repeats, ROOFLINE_REPEATS)
    rates = {
        **copy_bandwidth(shapes.copy_bytes, repeats),
        **matmul_rate(shapes.matmul_n, repeats),
    }
    report["copy_bandwidth_bytes_per_s"] = rates["bytes_per_s"]
    report["bf16_matmul_flops_per_s"] = rates["flops_per_s"]
    c = shapes.config
    report["model"] = {
        "layers": layers,
        "hidden_size": c.hidden_size,
        "heads": [c.num_attention_heads, c.num_key_value_heads, c.head_dim],
        "intermediate_size": c.intermediate_size,
        "experts": [c.num_local_experts, c.moe_intermediate_size, c.num_experts_per_tok],
        "vocab_size": c.vocab_size,
    }
    report["runs"] = [
        measure_model(shapes, quant, rates, args.repeats, deadline) for quant in formats
    ]
    report["moe_prefill_paths"] = measure_moe_paths(shapes, rates, args.repeats, deadline)
    report["total_s"] = round(time.perf_counter() - start, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
