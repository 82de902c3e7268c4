"""Benchmark: grok against Hugging Face Mixtral and llama.cpp on the same shape, fairly.

    python scripts/benchmark.py                         # the full comparison
    python scripts/benchmark.py --dtype float32 --repeats 1 --no-full-width   # a quick look
    python scripts/benchmark.py --engines grok llama --dtype bfloat16 --quantize fp8 \\
        --no-full-width                                 # grok bf16 and FP8 against llama.cpp
    python scripts/benchmark.py --compile-ratio --long-prompt 32768 --engines grok

Glossary: B batch, T prompt tokens, N new tokens, D model width, L layers.

How it is fair (``grok.bench.harness``, ``grok.bench.report``):

- Every measurement runs in its own fresh subprocess (``--child ENGINE``): JAX, torch and
  llama.cpp never share a process, and nothing one engine leaves behind (threads, caches,
  memory) slows another. The parent starts none of them (importing ``grok`` imports JAX, but
  no JAX backend starts there; torch and llama.cpp are never imported there).
- Every engine gets the same shape (``--shape``, default ``bench-grok1``: see
  ``grok.bench.shapes``), random prompts (T tokens, seed 0), N new tokens, greedy decoding,
  random weights, and the same CPUs: each child pins itself to ``--threads`` CPUs
  (``sched_setaffinity``) and sets torch's, OpenMP's and llama.cpp's thread counts to the same
  number.
- Engines are compared at the same precision: each ``--dtype`` (grok, Mixtral and llama.cpp
  in float32 or bfloat16 weights) and, with ``--quantize fp8``, 8-bit weights (grok's FP8,
  ``quantize="fp8"``, against llama.cpp's Q8_0; Mixtral has none).
- The engines alternate over ``--repeats`` (grok, Mixtral, llama.cpp, then backwards, ...);
  each child compiles / warms up first, then measures. The report gives the median over
  repeats and the spread (min, max).
- A ratio is printed only when the run is sane: batch 8 decodes at least as many tokens per
  second in total as batch 1, the time to first token is shorter than the whole generation,
  and the machine's 1-minute load (``os.getloadavg``) stayed at or below its core count for
  every child. Otherwise the ratio is replaced by the reason.
- A peer whose package is not installed (torch and transformers; llama-cpp-python and gguf)
  is skipped with the reason printed.

Figures per engine, format and batch: prefill of the T-token prompt into a KV cache (head at
the last position only), time to first token, decode tokens per second over the batch (N - 1
steps after the first token), the whole generation, and for grok the compile time (first call
minus a compiled one). ``--full-width`` (on by default) adds one Grok-2 decoder layer at full
width against the memory-bandwidth roofline (``grok.bench.roofline``).

Everything is written to ``--json`` (the tables in docs/performance.md are made from it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from grok.bench import gguf_file, llama, mixtral
from grok.bench.grok_engine import compile_child, grok_child, long_child
from grok.bench.harness import pin_threads, run_child
from grok.bench.llama import llama_child
from grok.bench.mixtral import mixtral_child
from grok.bench.report import FORMATS, evaluate, print_report
from grok.bench.roofline import bandwidth_child
from grok.bench.shapes import resolve

MODULE = "grok.bench.benchmark"
ENGINES = ("grok", "mixtral", "llama")
DTYPES = ("float32", "bfloat16")
QUANTIZE = ("none", "fp8")
PEERS_MISSING = {"mixtral": mixtral.missing, "llama": llama.missing}


def gguf_child(args: argparse.Namespace) -> dict:
    """Writes the GGUF files llama.cpp's children read (one per format, skipped if there)."""
    config = resolve(args.shape)
    written = {}
    for fmt in args.formats:
        path = gguf_file.gguf_path(args.gguf_dir, args.shape, fmt)
        if not path.exists():
            gguf_file.write_gguf(path, config, fmt)
        written[fmt] = {"path": str(path), "bytes": path.stat().st_size}
    return written


CHILDREN = {
    "grok": grok_child,
    "mixtral": mixtral_child,
    "llama": llama_child,
    "gguf": gguf_child,
    "bandwidth": bandwidth_child,
    "compile": compile_child,
    "long": long_child,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="bench-grok1", help="bench shape, preset or config path")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), help="of " + ", ".join(DTYPES))
    p.add_argument(
        "--quantize",
        nargs="+",
        default=["none"],
        choices=QUANTIZE,
        help="fp8: also 8-bit weights (grok FP8 against llama.cpp Q8_0)",
    )
    p.add_argument("--prompt-len", dest="T", type=int, default=128)
    p.add_argument("--new-tokens", dest="N", type=int, default=128)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per engine")
    p.add_argument("--threads", type=int, default=2, help="CPUs (and threads) per engine")
    p.add_argument("--no-mixtral", action="store_true", help="the same as leaving it out")
    p.add_argument("--gguf-dir", help="keep llama.cpp's GGUF files here (default: a temp dir)")
    p.add_argument("--no-full-width", action="store_true")
    p.add_argument("--full-width-experts", type=int, default=8)
    p.add_argument("--full-width-tokens", type=int, default=8)
    p.add_argument("--compile-ratio", action="store_true", help="compile time, 64 vs 2 layers")
    p.add_argument("--long-prompt", type=int, default=0, help="peak memory of this prefill")
    p.add_argument(
        "--long-decode", type=int, default=0, help="new tokens timed after --long-prompt"
    )
    p.add_argument("--json", default="benchmark.json")
    p.add_argument("--report", help="re-check and print a saved --json file instead of running")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is None and not set(args.dtype) <= set(DTYPES):  # a child gets its format
        p.error(f"argument --dtype: expected some of {', '.join(DTYPES)}, got {args.dtype}")
    return args


def child_argv(kind: str, formats: list[str], args: argparse.Namespace) -> list[str]:
    """The command line of one child: the parent's settings, ``formats`` as its --dtype."""
    argv = ["--child", kind, "--dtype", *formats, "--shape", args.shape]
    argv += ["--threads", str(args.threads), "--prompt-len", str(args.T)]
    argv += ["--new-tokens", str(args.N), "--batch", *map(str, args.batch)]
    argv += ["--full-width-experts", str(args.full_width_experts)]
    argv += ["--full-width-tokens", str(args.full_width_tokens)]
    argv += ["--long-prompt", str(args.long_prompt), "--long-decode", str(args.long_decode)]
    return argv + (["--gguf-dir", args.gguf_dir] if args.gguf_dir else [])


def child(kind: str, fmt: str, args: argparse.Namespace) -> dict:
    return run_child(MODULE, child_argv(kind, [fmt], args), f"{kind} {fmt}")


def available_engines(args: argparse.Namespace, skipped: dict[str, str]) -> list[str]:
    """The engines asked for that can run here; each one left out gets its reason."""
    engines = []
    for engine in args.engines:
        if engine == "mixtral" and args.no_mixtral:
            continue
        if reason := PEERS_MISSING.get(engine, lambda: None)():
            skipped[engine] = reason
            print(f"{engine} skipped: {reason}", flush=True)
        else:
            engines.append(engine)
    return engines


def write_gguf_files(engines: list[str], groups: list[str], args, skipped: dict) -> None:
    """Writes llama.cpp's GGUF files in a child (it needs JAX for the weights); on failure
    llama.cpp is skipped with the child's error."""
    formats = [FORMATS["llama"][g] for g in groups if g in FORMATS["llama"]]
    if "llama" not in engines or not formats:
        return
    figures = run_child(MODULE, child_argv("gguf", formats, args), "gguf files")
    if "error" in figures:
        skipped["llama"] = f"writing its GGUF files failed: {figures['error'][-500:]}"
        engines.remove("llama")
        print(f"llama skipped: {skipped['llama']}", flush=True)


def run(args: argparse.Namespace) -> dict:
    """Every child in turn; the figures, not yet evaluated."""
    cores = os.cpu_count() or 1
    res: dict = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "shape": args.shape,
        "prompt_len": args.T,
        "new_tokens": args.N,
        "batch": args.batch,
        "repeats": args.repeats,
        "threads": args.threads,
        "cores": cores,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_start": os.getloadavg(),
        "skipped": {},
    }
    start = time.perf_counter()
    engines = available_engines(args, res["skipped"])
    groups = list(args.dtype) + (["8-bit"] if "fp8" in args.quantize else [])
    write_gguf_files(engines, groups, args, res["skipped"])
    res["engines"] = engines
    runs: dict = {e: {FORMATS[e][g]: [] for g in groups if g in FORMATS[e]} for e in engines}
    for rep in range(args.repeats):
        order = engines if rep % 2 == 0 else engines[::-1]  # alternate who goes first
        print(f"repeat {rep + 1}/{args.repeats}", flush=True)
        for group in groups:
            for engine in order:
                if group in FORMATS[engine]:
                    fmt = FORMATS[engine][group]
                    runs[engine][fmt].append(child(engine, fmt, args))
    res["runs"] = runs
    if not args.no_full_width:
        res["full_width_layer"] = child("bandwidth", "bfloat16", args)
    if args.compile_ratio:
        res["compile"] = child("compile", args.dtype[0], args)
    if args.long_prompt:
        res["long_prompt"] = child("long", args.dtype[0], args)
    res["wall_s"] = time.perf_counter() - start
    res["load_end"] = os.getloadavg()
    return res


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        pin_threads(args.threads)
        args.formats, args.dtype = args.dtype, args.dtype[0]
        print(json.dumps(CHILDREN[args.child](args)))
        return
    if args.report:
        res = json.loads(Path(args.report).read_text())
        evaluate(res)
        print_report(res)
        return
    if "llama" in args.engines and not args.gguf_dir:
        with tempfile.TemporaryDirectory(prefix="grok-bench-gguf-") as tmp:
            args.gguf_dir = tmp
            res = run(args)
    else:
        res = run(args)
    evaluate(res)
    Path(args.json).write_text(json.dumps(res, indent=2))
    print_report(res)


if __name__ == "__main__":
    main()
