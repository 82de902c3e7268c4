"""The paged KV cache's targets (``--targets`` of ``grok.bench.serve``): prefix, long, many
and throughput, each engine configuration in fresh server processes, medians of the runs."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np

from grok.bench.serve_clients import run_level, server, sse_chunks

BENCH_MODEL = "grok-bench"
BENCH_CONTEXT = 8192
VOCAB_LOW, VOCAB_HIGH = 3, 2000  # random prompt ids: clear of the special tokens

# -- the paged KV cache's targets ------------------------------------------------------------


def bench_model(directory: Path) -> Path:
    """The targets' checkpoint in ``directory`` (written once, then reused): random float32
    weights of ``bench`` at context 8192 with the built-in tokenizer's vocabulary, and that
    tokenizer beside them."""
    from grok.bench.shapes import BENCH
    from grok.builtin import builtin_dir
    from grok.testing import write_checkpoint

    config = BENCH.replace(vocab_size=2048, max_position_embeddings=BENCH_CONTEXT)
    done = directory / "written"
    if not done.exists():
        shutil.rmtree(directory, ignore_errors=True)
        write_checkpoint(directory, config, 0)
        shutil.copy(builtin_dir() / "tokenizer.tok.json", directory / "tokenizer.tok.json")
        done.write_text("written by scripts/bench_serve.py\n")
    return directory


SERVE_FLAGS: list[str] = []  # --serve-flags: given to every server of the targets


def bench_flags(directory: Path, *extra: str) -> list[str]:
    """``grok-serve`` flags for the targets' model (float32, context 8192), then
    ``--serve-flags``, then ``extra`` (the target's own)."""
    return [
        "--checkpoint", str(directory), "--served-model-name", BENCH_MODEL,
        "--dtype", "float32", "--max-context", str(BENCH_CONTEXT), *SERVE_FLAGS, *extra,
    ]  # fmt: skip


def ids(rng: np.random.Generator, n: int) -> list[int]:
    """``n`` random prompt token ids."""
    return rng.integers(VOCAB_LOW, VOCAB_HIGH, n).tolist()


async def stream(
    client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int, **fields
) -> tuple[float, list[float], str]:
    """One streamed greedy completion of token ids, ``logprobs`` 0 so that every token comes
    as its own chunk: (start, each token's arrival time, the text)."""
    body = {
        "model": BENCH_MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "logprobs": 0, "stream": True, **fields,
    }  # fmt: skip
    start, times, text = time.perf_counter(), [], []
    async for chunk in sse_chunks(client, url, body):
        if chunk.get("error"):
            raise RuntimeError(chunk["error"])
        for choice in chunk["choices"]:  # a last chunk may carry text and no token
            tokens = (choice.get("logprobs") or {}).get("tokens", [])
            times.extend([time.perf_counter()] * len(tokens))
            text.append(choice["text"])
    return start, times, "".join(text)


async def concurrent(
    url: str, prompts: list[list[int]], max_tokens: int, **fields
) -> tuple[float, list]:
    """Every prompt at once (``fields`` added to each request): (seconds until the last one
    ends, their ``stream`` results)."""
    async with httpx.AsyncClient(timeout=1800) as client:
        start = time.perf_counter()
        requests = (stream(client, url, p, max_tokens, **fields) for p in prompts)
        out = await asyncio.gather(*requests)
        return time.perf_counter() - start, out


def summary(values: list[float]) -> str:
    """``median (min-max)`` of ``values``."""
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def target_prefix(directory: Path, runs: int, rng: np.random.Generator) -> dict:
    """Target prefix (see the module's docstring)."""
    prefix, tail, new = ids(rng, 2048), 32, 8
    out: dict[str, list] = {"shared_s": [], "unique_s": [], "shared_no_cache_s": []}
    checked: list[tuple[list[int], str]] = []
    with server(bench_flags(directory)) as url:
        asyncio.run(concurrent(url, [prefix + ids(rng, tail)], new))  # warm: the prefix cached
        # Compile both batches' shapes before measuring.
        asyncio.run(concurrent(url, [prefix + ids(rng, tail) for _ in range(8)], new))
        asyncio.run(concurrent(url, [ids(rng, 2048 + tail) for _ in range(8)], new))
        for _ in range(runs):  # alternated
            prompts = [prefix + ids(rng, tail) for _ in range(8)]
            seconds, results = asyncio.run(concurrent(url, prompts, new))
            out["shared_s"].append(seconds)
            checked = [(p, r[2]) for p, r in zip(prompts, results, strict=True)]
            unique = [ids(rng, 2048 + tail) for _ in range(8)]
            out["unique_s"].append(asyncio.run(concurrent(url, unique, new))[0])
    with server(bench_flags(directory, "--no-prefix-cache")) as url:
        asyncio.run(concurrent(url, [prefix + ids(rng, tail) for _ in range(8)], new))  # compile
        for _ in range(runs):
            prompts = [prefix + ids(rng, tail) for _ in range(8)]
            out["shared_no_cache_s"].append(asyncio.run(concurrent(url, prompts, new))[0])
    out["speedup"] = statistics.median(out["unique_s"]) / statistics.median(out["shared_s"])
    out["greedy_equal"] = greedy_equal(directory, checked, new)
    print(
        f"prefix: 8 sharing a 2048-token prefix {summary(out['shared_s'])} s, 8 unique "
        f"{summary(out['unique_s'])} s: {out['speedup']:.2f}x (target >= 5x); without the "
        f"prefix cache {summary(out['shared_no_cache_s'])} s; greedy text equals "
        f"Model.generate's: {out['greedy_equal']}",
        flush=True,
    )
    return out


def greedy_equal(directory: Path, checked: list[tuple[list[int], str]], new: int) -> bool:
    """Whether each (prompt ids, text) is ``Model.generate``'s greedy text for the prompt."""
    import jax.numpy as jnp

    import grok
    from grok.tokenizer import load_tokenizer

    model = grok.load_pretrained(directory, dtype=jnp.float32, quiet=True)
    tok = load_tokenizer(directory)
    prompts = [p for p, _ in checked]
    tokens = model.generate(prompts, max_new_tokens=new, stop_tokens=[tok.eos_id]).tokens
    return all(tok.decode(list(t)) == text for t, (_, text) in zip(tokens, checked, strict=True))


def _sample(text: str, name: str) -> float:
    """The value of the sample ``name`` in Prometheus text (0 if absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def target_long(directory: Path, runs: int, rng: np.random.Generator) -> dict:
    """Target long (see the module's docstring); the prompt's prefill in one piece (a server
    with ``--prefill-chunk 8192``) for comparison."""
    out: dict[str, list] = {
        "alone_ttft_s": [], "loaded_ttft_s": [], "max_pause_s": [], "whole_ttft_s": []
    }  # fmt: skip
    with server(bench_flags(directory, "--prefill-chunk", str(BENCH_CONTEXT))) as url:
        asyncio.run(concurrent(url, [ids(rng, 6000)], 1))  # compile
        for _ in range(runs):
            _, results = asyncio.run(concurrent(url, [ids(rng, 6000)], 1))
            out["whole_ttft_s"].append(results[0][1][0] - results[0][0])
    with server(bench_flags(directory)) as url:
        asyncio.run(concurrent(url, [ids(rng, 6000)], 1))  # compile the pieces
        asyncio.run(concurrent(url, [ids(rng, 16) for _ in range(4)], 4))
        for _ in range(runs):  # alternated; a new prompt each time (no prefix-cache hits)
            _, results = asyncio.run(concurrent(url, [ids(rng, 6000)], 1))
            start, times, _ = results[0]
            out["alone_ttft_s"].append(times[0] - start)
            pauses = asyncio.run(_loaded(url, ids(rng, 6000), rng))
            out["loaded_ttft_s"].append(pauses["ttft_s"])
            out["max_pause_s"].append(pauses["max_pause_s"])
    # Each run's ratios to the prefill alone measured just before it (the machine's load
    # drifts between runs), then their medians.
    pairs = zip(out["alone_ttft_s"], out["loaded_ttft_s"], out["max_pause_s"], strict=True)
    ratios = [(loaded / alone, pause / alone) for alone, loaded, pause in pairs]
    out["ttft_ratios"], out["pause_ratios"] = (list(r) for r in zip(*ratios, strict=True))
    whole = statistics.median(out["whole_ttft_s"])
    print(
        f"long: a 6000-token prompt alone {summary(out['alone_ttft_s'])} s to its first token "
        f"(in one piece: {summary(out['whole_ttft_s'])} s), under 4 streams "
        f"{summary(out['loaded_ttft_s'])} s: {summary(out['ttft_ratios'])}x its time alone "
        f"(target <= 1.5x); the streams' longest pause {summary(out['max_pause_s'])} s: "
        f"{summary(out['pause_ratios'])} of its prefill alone (target <= 0.15; "
        f"{statistics.median(out['max_pause_s']) / whole:.3f} of the one piece)",
        flush=True,
    )
    return out


async def _loaded(url: str, long_prompt: list[int], rng: np.random.Generator) -> dict:
    """4 greedy streams of 8 + 4000 tokens; after 2 s the long prompt arrives. Its time to
    first token, and the streams' longest pause between two tokens from its arrival until a
    second after its first token."""
    async with httpx.AsyncClient(timeout=1800) as client:
        times: list[list[float]] = [[] for _ in range(4)]

        async def follow(i: int) -> None:
            body = {
                "model": BENCH_MODEL, "prompt": ids(rng, 8), "max_tokens": 4000,
                "temperature": 0, "logprobs": 0, "stream": True,
            }  # fmt: skip
            async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        times[i].append(time.perf_counter())

        streams = [asyncio.ensure_future(follow(i)) for i in range(4)]
        while min(len(t) for t in times) < 16:  # every stream is running
            await asyncio.sleep(0.05)
        start, long_times, _ = await stream(client, url, long_prompt, 1)
        first = long_times[0]
        await asyncio.sleep(1.0)
        for s in streams:
            s.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
    pauses = [
        b - a
        for t in times
        for a, b in zip(t, t[1:], strict=False)
        if b >= start and a <= first + 1.0
    ]
    return {"ttft_s": first - start, "max_pause_s": max(pauses)}


def target_many(directory: Path, runs: int, rng: np.random.Generator) -> dict:
    """Target many (see the module's docstring)."""
    flags = ["--max-batch", "64", "--kv-cache-tokens", "16384"]
    out: dict[str, list] = {"seconds": [], "complete": [], "preemptions": []}
    with server(bench_flags(directory, *flags)) as url:
        for _ in range(runs):
            prompts = [ids(rng, 100) for _ in range(64)]
            # ignore_eos: every request makes its 50 tokens (random weights may draw the end).
            seconds, results = asyncio.run(concurrent(url, prompts, 50, ignore_eos=True))
            out["seconds"].append(seconds)
            out["complete"].append(sum(len(r[1]) == 50 for r in results))
        out["preemptions"] = _sample(httpx.get(f"{url}/metrics").text, "grok_preemptions_total")
    print(
        f"many: 64 x (100 + 50 tokens) at --max-batch 64 --kv-cache-tokens 16384: "
        f"{summary(out['seconds'])} s, complete {out['complete']} of 64 (target: all), "
        f"{out['preemptions']:.0f} preemptions",
        flush=True,
    )
    return out


def target_throughput(directory: Path, runs: int, rng: np.random.Generator) -> dict:
    """Target throughput (see the module's docstring): closed loops of 64-token completions."""
    out: dict[str, list] = {"one": [], "eight": []}
    with server(bench_flags(directory)) as url:
        for c in (1, 2, 4, 8):  # compile the prefill's row counts
            asyncio.run(run_level(url, BENCH_MODEL, c, 1, 64))
        for _ in range(runs):  # alternated
            out["one"].append(asyncio.run(run_level(url, BENCH_MODEL, 1, 4, 64)))
            out["eight"].append(asyncio.run(run_level(url, BENCH_MODEL, 8, 4, 64)))
    one = [r["output_tokens_per_s"] for r in out["one"]]
    eight = [r["output_tokens_per_s"] for r in out["eight"]]
    out["speedup"] = statistics.median(eight) / statistics.median(one)
    print(
        f"throughput: 1 client {summary(one)} tok/s, 8 clients {summary(eight)} tok/s: "
        f"{out['speedup']:.2f}x (target >= 4x)",
        flush=True,
    )
    return out


TARGETS = {
    "prefix": target_prefix,
    "long": target_long,
    "many": target_many,
    "throughput": target_throughput,
}


def targets(args: argparse.Namespace) -> None:
    """The paged KV cache's targets (``--targets``), each in fresh server processes."""
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    directory = bench_model(Path(args.model_dir))
    rng = np.random.default_rng(args.seed)
    results = {}
    for name in args.targets.split(","):
        results[name] = TARGETS[name](directory, args.runs, rng)
    print(json.dumps(results, default=str))
