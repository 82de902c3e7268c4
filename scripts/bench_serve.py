"""grok-serve under 1, 8 and 32 concurrent clients: requests/s, output tokens/s, TTFT p50/p99.

    python scripts/bench_serve.py                      # starts grok-serve (built-in model)
    python scripts/bench_serve.py --url http://127.0.0.1:8000 --model grok-builtin

Each client is a closed loop of streamed /v1/completions requests (the next starts when the
last ends); time to first token is measured at the first chunk with text. Before measuring,
one round at every concurrency compiles the server's shapes. Targets: 8 clients get at least
4x the output tokens/s of one, and the p99 time to first token at 8 clients is within 3x of
one client's (an idle server). The server and the clients share the machine: run it on an
otherwise idle one, and compare ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "A class definition",
    "The for statement is used to",
    "Exceptions are raised when",
    "The import system",
]


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, int]:
    """(seconds to the first text chunk, completion tokens) of one streamed request."""
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
    return (first if first is not None else time.perf_counter() - start), tokens


async def run_level(url: str, model: str, clients: int, per_client: int, max_tokens: int):
    """Runs ``clients`` closed loops of ``per_client`` requests; returns the figures."""
    ttfts: list[float] = []
    total_tokens = 0
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def loop(c: int) -> None:
            nonlocal total_tokens
            for i in range(per_client):
                body = {
                    "model": model,
                    "prompt": PROMPTS[(c + i) % len(PROMPTS)],
                    "max_tokens": max_tokens,
                    "temperature": 0.8,
                    "seed": c * 1000 + i,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                ttft, tokens = await one_request(client, url, body)
                ttfts.append(ttft)
                total_tokens += tokens

        start = time.perf_counter()
        await asyncio.gather(*(loop(c) for c in range(clients)))
        elapsed = time.perf_counter() - start
    ttfts.sort()
    p99 = ttfts[min(len(ttfts) - 1, int(round(0.99 * (len(ttfts) - 1))))]
    return {
        "clients": clients,
        "requests": len(ttfts),
        "requests_per_s": len(ttfts) / elapsed,
        "output_tokens_per_s": total_tokens / elapsed,
        "ttft_p50_ms": statistics.median(ttfts) * 1e3,
        "ttft_p99_ms": p99 * 1e3,
    }


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "grok.serve", "--port", str(port)]
    cmd += ["--max-batch", str(args.max_batch), "--dtype", args.dtype]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"grok-serve exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("grok-serve did not start within 300 s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="a running server (default: start grok-serve here)")
    p.add_argument("--model", default="grok-builtin", help="the served model name")
    p.add_argument("--max-batch", type=int, default=8, help="--max-batch of the started server")
    p.add_argument("--dtype", default="bfloat16", help="--dtype of the started server")
    p.add_argument("--clients", default="1,8,32", help="concurrency levels")
    p.add_argument("--requests", type=int, default=64, help="requests per level (at least 2 each)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    args = p.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    proc, url = (None, args.url) if args.url else start_server(args)
    try:
        for c in levels:  # compile every shape these levels will use
            asyncio.run(run_level(url, args.model, c, 1, args.max_tokens))
        results = []
        for c in levels:
            per_client = max(2, args.requests // c)
            r = asyncio.run(run_level(url, args.model, c, per_client, args.max_tokens))
            results.append(r)
            print(
                f"{c:3d} clients: {r['requests']:4d} requests, {r['requests_per_s']:7.2f} req/s, "
                f"{r['output_tokens_per_s']:8.1f} output tok/s, TTFT p50 "
                f"{r['ttft_p50_ms']:7.1f} ms, p99 {r['ttft_p99_ms']:7.1f} ms",
                flush=True,
            )
        by = {r["clients"]: r for r in results}
        if 1 in by and 8 in by:
            speedup = by[8]["output_tokens_per_s"] / by[1]["output_tokens_per_s"]
            ttft = by[8]["ttft_p99_ms"] / by[1]["ttft_p99_ms"]
            print(
                f"8 vs 1 client: {speedup:.2f}x output tok/s (target >= 4x); "
                f"p99 TTFT {ttft:.2f}x the idle server's (target <= 3x)"
            )
        print(json.dumps(results))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
