"""grok-serve's robustness checks (``--check-bounds``, ``--check-drain``,
``--check-isolation`` of ``grok.bench.serve``): each in fresh server processes of its own, a
line per check (PASS or FAIL), exit status 1 when a target is missed."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx

from grok.bench.serve_clients import start_server
from grok.builtin import builtin_dir

# -- robustness checks (--check-bounds, --check-drain, --check-isolation) ---------------------

UPLOAD_BYTES = 100_000_000


def _robust_server(args: argparse.Namespace, *flags: str) -> tuple[subprocess.Popen, str, int]:
    """A fresh grok-serve (built-in model, float32) with ``flags``; (process, url, port)."""
    flags = ("--dtype", "float32", "--max-batch", str(args.max_batch), *flags)
    proc, url = start_server(list(flags))
    return proc, url, int(url.rsplit(":", 1)[1])


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


def upload_100mb(port: int, chunked: bool) -> tuple[str, float, int]:
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
            status, seconds, sent = upload_100mb(port, chunked)
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
        data = json.loads((builtin_dir() / "tokenizer.tok.json").read_text())
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
