"""grok-serve's benchmark clients: a server started in a fresh process, closed-loop streaming
clients, and the throughput levels (``python -m grok.bench.serve``; see ``grok.bench.serve``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import httpx

from grok.bench.harness import free_port, stop_process

PROMPTS = [
    "A class definition",
    "The for statement is used to",
    "Exceptions are raised when",
    "The import system",
]


async def sse_chunks(client: httpx.AsyncClient, url: str, body: dict) -> AsyncIterator[dict]:
    """The parsed chunks of one streamed /v1/completions request (``data: [DONE]`` left out)."""
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[len("data: ") :])


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, int]:
    """(seconds to the first text chunk, completion tokens) of one streamed request."""
    start = time.perf_counter()
    first = None
    tokens = 0
    async for chunk in sse_chunks(client, url, body):
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
            first = time.perf_counter() - start
    return (first if first is not None else time.perf_counter() - start), tokens


async def run_level(
    url: str, model: str, clients: int, per_client: int, max_tokens: int
) -> dict[str, float]:
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


def start_server(flags: list[str]) -> tuple[subprocess.Popen, str]:
    """A fresh ``grok-serve`` process with ``flags`` on a free port; (process, base URL) once
    /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "grok.serve", "--port", str(port), *flags]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
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
    raise SystemExit("grok-serve did not start within 600 s")


@contextlib.contextmanager
def server(flags: list[str]) -> Iterator[str]:
    """``start_server`` for a ``with`` block; the process is stopped at its end."""
    proc, url = start_server(flags)
    try:
        yield url
    finally:
        stop_process(proc)


def levels(args: argparse.Namespace) -> None:
    """The throughput levels (``--clients``) on one server (``--url``, or a fresh built-in)."""
    levels = [int(c) for c in args.clients.split(",")]
    flags = ["--max-batch", str(args.max_batch), "--dtype", args.dtype]
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(server(flags))
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
