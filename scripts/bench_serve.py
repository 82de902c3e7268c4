"""grok-serve under load: throughput levels, and the paged KV cache's targets.

    python scripts/bench_serve.py                      # 1, 8, 32 clients (built-in model)
    python scripts/bench_serve.py --url http://127.0.0.1:8000 --model grok-builtin
    python scripts/bench_serve.py --targets prefix,long,many,throughput --runs 3
    python scripts/bench_serve.py --check-bounds --check-drain --check-isolation

Levels: each client is a closed loop of streamed /v1/completions requests (the next starts
when the last ends); time to first token is measured at the first chunk with text. Before
measuring, one round at every concurrency compiles the server's shapes. Targets: 8 clients get
at least 4x the output tokens/s of one, and the p99 time to first token at 8 clients is within
3x of one client's (an idle server).

``--targets`` measures the paged KV cache's targets on a random-weight Grok-2-architecture
model (``bench`` of ``bench_shapes.py``: D 512, 8 layers, 8/2 heads of 64, 8 experts; the
built-in tokenizer's 2048-token vocabulary; context 8192) served in float32, each engine
configuration in a fresh server process, every figure the median of ``--runs`` runs:

- prefix: 8 concurrent requests sharing a 2048-token prefix (after one warm request) against 8
  with unique prompts of the same length, alternated: >= 5x faster; the shared requests'
  greedy text equals ``Model.generate``'s. The same shared requests on a server with
  ``--no-prefix-cache`` for comparison.
- long: a 6000-token prompt arrives while 4 clients stream: no stream pauses longer than 15%
  of that prompt's prefill alone (its time to first token on the idle server), and its own
  time to first token stays within 1.5x of that.
- many: ``--max-batch 64 --max-context 8192 --kv-cache-tokens 16384``: 64 concurrent requests
  of 100 prompt tokens and 50 new tokens all complete.
- throughput: 8 closed-loop clients get >= 4x the output tokens/s of one (runs alternated).

``--check-bounds``, ``--check-drain`` and ``--check-isolation`` run the robustness checks
instead (each in fresh server processes of its own; see ``check_bounds`` and the others) and
exit 1 when a target is missed.

The server and the clients share the machine: on a busy machine the absolute figures are low
and noisy (``uptime`` is printed first), so compare within one run and rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent

PROMPTS = [
    "A class definition",
    "The for statement is used to",
    "Exceptions are raised when",
    "The import system",
]
BENCH_MODEL = "grok-bench"
BENCH_CONTEXT = 8192
VOCAB_LOW, VOCAB_HIGH = 3, 2000  # random prompt ids: clear of the special tokens


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "grok.serve", "--port", str(port), *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
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
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


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


# -- robustness checks (--check-bounds, --check-drain, --check-isolation) ---------------------

UPLOAD_BYTES = 100_000_000


def _robust_server(args: argparse.Namespace, *flags: str) -> tuple[subprocess.Popen, str, int]:
    """A fresh grok-serve (built-in model, float32) with ``flags``; (process, url, port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "grok.serve", "--port", str(port), "--dtype", "float32"]
    cmd += ["--max-batch", str(args.max_batch), *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"grok-serve exited with status {proc.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url, port
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("grok-serve did not start within 300 s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _target(results: list[dict], name: str, ok: bool, detail: str) -> None:
    results.append({"check": name, "ok": ok, "detail": detail})
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


def _upload(port: int, chunked: bool) -> tuple[str, float, int]:
    """(status line, seconds from the upload's first byte to the answer, bytes sent) of a
    100 MB body, sent from a thread while the answer is read, as a streaming client does."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {UPLOAD_BYTES}"
    block = b"x" * 65536
    piece = b"%x\r\n%s\r\n" % (len(block), block) if chunked else block
    sent = [0]

    def upload() -> None:
        with contextlib.suppress(OSError):  # closed after the server's answer
            while sent[0] < UPLOAD_BYTES:
                sock.sendall(piece)
                sent[0] += len(block)

    start = time.perf_counter()
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n".encode())
    threading.Thread(target=upload, daemon=True).start()
    answer = b""
    with contextlib.suppress(OSError):
        while b"\r\n" not in answer:
            data = sock.recv(4096)
            if not data:
                break
            answer += data
    seconds = time.perf_counter() - start
    sock.close()
    return answer.split(b"\r\n")[0].decode(errors="replace"), seconds, sent[0]


def check_bounds(args: argparse.Namespace, results: list[dict]) -> None:
    """A 100 MB body is refused (413) within 1 s of its upload's start, with Content-Length
    and chunked; ten 1 MB stop strings get 400 in milliseconds with the server's RSS unchanged
    (within 8 MiB); a 100 MB prompt string under a raised body limit gets 400 without being
    tokenised (it was 6.6-7.2 s of tokenising)."""
    proc, url, port = _robust_server(args)
    try:
        for chunked in (False, True):
            status, seconds, sent = _upload(port, chunked)
            how = "chunked" if chunked else "Content-Length"
            _target(
                results,
                f"100 MB body ({how})",
                status.startswith("HTTP/1.1 413") and seconds < 1.0,
                f"{status!r} after {seconds * 1e3:.1f} ms, {sent / 2**20:.1f} MiB sent "
                "(target: 413 within 1 s)",
            )
        body = {"model": args.model, "prompt": "A", "max_tokens": 2, "stop": ["x" * 2**20]}
        with httpx.Client(timeout=60) as client:
            client.post(f"{url}/v1/completions", json=body)  # the first one's allocations
            before = _rss_mib(proc.pid)
            times, codes = [], set()
            for _ in range(10):
                start = time.perf_counter()
                codes.add(client.post(f"{url}/v1/completions", json=body).status_code)
                times.append(time.perf_counter() - start)
            grown = _rss_mib(proc.pid) - before
        _target(
            results,
            "1 MB stop string",
            codes == {400} and grown < 8,
            f"status {sorted(codes)}, median {statistics.median(times) * 1e3:.1f} ms per request "
            f"(1 MB sent), RSS {before:.1f} MiB -> {before + grown:.1f} MiB over 10 requests",
        )
    finally:
        _stop(proc)
    proc, url, _ = _robust_server(args, "--max-body-bytes", str(2 * UPLOAD_BYTES))
    try:
        body = {"model": args.model, "prompt": "x " * (UPLOAD_BYTES // 2), "max_tokens": 2}
        payload = json.dumps(body).encode()
        before = _rss_mib(proc.pid)
        start = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", content=payload, timeout=120)
        seconds = time.perf_counter() - start
        _target(
            results,
            "100 MB prompt string",
            r.status_code == 400 and seconds < 2.0,
            f"status {r.status_code} in {seconds:.2f} s (upload and JSON parse included); "
            f"RSS {before:.1f} -> {_rss_mib(proc.pid):.1f} MiB",
        )
    finally:
        _stop(proc)


def check_drain(args: argparse.Namespace, results: list[dict]) -> None:
    """SIGTERM with streams running and idle clients connected (a keep-alive client and a
    socket that never sends): /health and new requests get 503 during the drain, the process
    exits 0 within --drain-timeout + 5 s, and every stream finished or ended with an error
    naming the timeout."""
    drain = args.drain_timeout
    proc, url, port = _robust_server(args, "--drain-timeout", str(drain))
    try:
        common = {"model": args.model, "prompt": "A", "temperature": 0, "ignore_eos": True}
        idle = httpx.Client(timeout=60)
        idle.post(f"{url}/v1/completions", json={**common, "max_tokens": 2})  # compiles
        silent = socket.create_connection(("127.0.0.1", port))
        ends: dict[str, str] = {}
        started = threading.Event()

        def stream(name: str, body: dict) -> None:
            last = ""
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        started.set()
                        if line != "data: [DONE]":
                            last = line
            ends[name] = last

        bodies = {  # a short stream, then 8 x n=16 long ones: many times --drain-timeout
            "short": {**common, "max_tokens": 32, "stream": True},
            **{
                f"long{i}": {**common, "max_tokens": 400, "n": 16, "stream": True} for i in range(8)
            },
        }
        threads = [threading.Thread(target=stream, args=item) for item in bodies.items()]
        for t in threads:
            t.start()
        started.wait(120)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.3)
        health = httpx.get(f"{url}/health", timeout=10).status_code
        refused = idle.post(f"{url}/v1/completions", json={**common, "max_tokens": 2})
        try:
            code = proc.wait(timeout=drain + 30)
        except subprocess.TimeoutExpired:
            code = None
        exited = time.monotonic() - signalled
        for t in threads:
            t.join(timeout=30)
        idle.close()
        silent.close()
    finally:
        _stop(proc)
    _target(
        results,
        "503 while draining",
        health == 503 and refused.status_code == 503 and "retry-after" in refused.headers,
        f"/health {health}, a new request {refused.status_code} "
        f"(Retry-After {refused.headers.get('retry-after')})",
    )
    _target(
        results,
        "SIGTERM exits 0",
        code == 0 and exited < drain + 5,
        f"exit status {code} after {exited:.2f} s (target: 0 within {drain:g} + 5 s)",
    )
    summary = {}
    for name, last in ends.items():
        chunk = json.loads(last[len("data: ") :]) if last else {}
        if "error" in chunk:
            summary[name] = "error: " + chunk["error"]["message"]
        else:
            summary[name] = f"finish_reason {chunk.get('choices', [{}])[0].get('finish_reason')}"
    clear = len(summary) == len(bodies) and all(
        "drain-timeout" in v or v in ("finish_reason length", "finish_reason stop")
        for v in summary.values()
    )
    _target(results, "every stream ended clearly", clear, json.dumps(summary))


def check_isolation(args: argparse.Namespace, results: list[dict]) -> None:
    """The issue's reproduction: a tokenizer of 600 ids for the model's 2048 (sampled ids it
    cannot decode used to fail the request and stop the engine), eight streams with
    logprobs, and a client that drops its stream; then /health is 200 and the next request
    succeeds."""
    with tempfile.TemporaryDirectory() as tmp:
        data = json.loads((ROOT / "grok" / "builtin" / "tokenizer.tok.json").read_text())
        data["regular_tokens"] = [e for e in data["regular_tokens"] if e["token"] < 600]
        data.pop("vocab_size", None)
        small = Path(tmp) / "tokenizer.tok.json"
        small.write_text(json.dumps(data))
        proc, url, _ = _robust_server(args, "--tokenizer", str(small))
        try:
            body = {"model": args.model, "prompt": "A class", "max_tokens": 64, "logprobs": 5}

            async def streams() -> list[tuple[int, str]]:
                async with httpx.AsyncClient(timeout=120) as client:

                    async def one(seed: int) -> tuple[int, str]:
                        r = await client.post(
                            f"{url}/v1/completions", json={**body, "seed": seed, "stream": True}
                        )
                        return r.status_code, r.text

                    return await asyncio.gather(*(one(seed) for seed in range(8)))

            answers = asyncio.run(streams())
            with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
                next(r.iter_lines())  # then drop the connection mid-stream
            health = httpx.get(f"{url}/health", timeout=10).status_code
            after = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        finally:
            _stop(proc)
    errors = sum('data: {"error"' in text or status != 200 for status, text in answers)
    replaced = sum("\\ufffd" in text or "\ufffd" in text for _, text in answers)
    _target(
        results,
        "one sequence's failure",
        errors == 0 and health == 200 and after.status_code == 200,
        f"8 streams: {errors} errors, {replaced} with U+FFFD text; then /health {health}, "
        f"the next request {after.status_code}",
    )


def run_checks(args: argparse.Namespace) -> int:
    """The robustness checks the flags ask for; 1 when a target is missed."""
    results: list[dict] = []
    if args.check_bounds:
        check_bounds(args, results)
    if args.check_drain:
        check_drain(args, results)
    if args.check_isolation:
        check_isolation(args, results)
    print(json.dumps(results))
    return 0 if all(r["ok"] for r in results) else 1


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
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("error"):
                raise RuntimeError(chunk["error"])
            for choice in chunk["choices"]:
                times.extend([time.perf_counter()] * len(choice["logprobs"]["tokens"]))
                text.append(choice["text"])
    return start, times, "".join(text)


async def concurrent(url: str, prompts: list[list[int]], max_tokens: int) -> tuple[float, list]:
    """Every prompt at once: (seconds until the last one ends, their ``stream`` results)."""
    async with httpx.AsyncClient(timeout=1800) as client:
        start = time.perf_counter()
        out = await asyncio.gather(*(stream(client, url, p, max_tokens) for p in prompts))
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
            seconds, results = asyncio.run(concurrent(url, prompts, 50))
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="a running server for the levels (default: start grok-serve)")
    p.add_argument("--model", default="grok-builtin", help="the served model name")
    p.add_argument("--max-batch", type=int, default=8, help="--max-batch of the started server")
    p.add_argument("--dtype", default="bfloat16", help="--dtype of the started server")
    p.add_argument("--clients", default="1,8,32", help="concurrency levels")
    p.add_argument("--requests", type=int, default=64, help="requests per level (at least 2 each)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    p.add_argument("--targets", help=f"measure these targets instead: {','.join(TARGETS)}")
    p.add_argument("--runs", type=int, default=3, help="runs per target (medians reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the targets' random prompts")
    p.add_argument(
        "--serve-flags", default="", help="more grok-serve flags for the targets' servers"
    )
    p.add_argument(
        "--model-dir",
        default=str(Path(tempfile.gettempdir()) / "grok-bench-serve-model"),
        help="where the targets' random-weight checkpoint is written (once) and read",
    )
    # Robustness checks: each flag runs its check (instead of the levels).
    p.add_argument("--check-bounds", action="store_true", help="413/400 bounds and memory")
    p.add_argument("--check-drain", action="store_true", help="SIGTERM: drain and exit 0")
    p.add_argument("--check-isolation", action="store_true", help="one sequence's failure")
    p.add_argument("--drain-timeout", type=float, default=5.0, help="for --check-drain")
    args = p.parse_args()
    if args.check_bounds or args.check_drain or args.check_isolation:
        sys.exit(run_checks(args))
    if args.targets:
        unknown = set(args.targets.split(",")) - set(TARGETS)
        if unknown:
            p.error(f"--targets: unknown {sorted(unknown)}; known: {','.join(TARGETS)}")
        SERVE_FLAGS.extend(args.serve_flags.split())
        targets(args)
    else:
        levels(args)


if __name__ == "__main__":
    main()
