"""grok-serve's robustness: one bad sequence never stops the engine, requests are bounded
before any work, the tokenizer may be smaller than the vocabulary, ``ignore_eos`` and
``min_tokens``.

In process (the app through Starlette's TestClient, the engine driven directly where a fault
is injected into one sequence), on the built-in model in float32. Every engine here has the
same shapes, so they share the compiled programs. SIGTERM's drain runs a real server
subprocess (``test_sigterm_drains_and_exits_0``).
"""

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jax.numpy as jnp
import pytest
from conftest import FAST_COMPILE_FLAGS
from starlette.testclient import TestClient

import grok
from grok.bench.harness import free_port
from grok.bench.serve_checks import upload_100mb
from grok.builtin import builtin_dir
from grok.errors import TokenizerError
from grok.serve import batch
from grok.serve.app import create_app
from grok.serve.engine import Engine
from grok.serve.metrics import Metrics
from grok.serve.protocol import MAX_STOP_CHARS, RequestError, parse_generation
from grok.serve.sequence import SamplingParams, SequenceRequest
from grok.serve.text import REPLACEMENT, ServedTokenizer, TextTracker
from grok.tokenizer import TokJsonTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
MODEL = "grok-builtin"
SLOTS = 4
CONTEXT = 64  # small: every engine here compiles (or shares) the same few shapes
WAIT_S = 120  # bound on any wait for the engine (compiles included, on a busy machine)
PROMPTS = ["A class definition", "The for statement", "Exceptions are raised when"]


@pytest.fixture(scope="module")
def model():
    return grok.load_pretrained("builtin", dtype=jnp.float32, quiet=True)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(builtin_dir())


def _engine(model, tokenizer) -> Engine:
    return Engine(
        model, tokenizer, max_batch=SLOTS, max_context=CONTEXT, max_queue=8, metrics=Metrics(4)
    )


@pytest.fixture(scope="module")
def served(model, tok):
    """(engine, client) of one running app; the client's lifespan runs the engine thread."""
    engine = _engine(model, tok)
    app = create_app(engine, served_name=MODEL, metrics=engine.metrics)
    with TestClient(app) as client:
        yield engine, client


def _completion(client, **fields):
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, **fields}
    return client.post("/v1/completions", json=body)


class _Run:
    """Sequences submitted together and what each received."""

    def __init__(self, engine: Engine, tok, specs):
        self.updates = [[] for _ in specs]
        self.done = [threading.Event() for _ in specs]
        self.seqs = []
        for i, (prompt, params, make_sink, tokenizer) in enumerate(specs):
            sink = make_sink(self._collector(i)) if make_sink else self._collector(i)
            ids = tok.encode(prompt)
            self.seqs.append(SequenceRequest(ids, params, sink, tokenizer or tok, index=i))

    def _collector(self, i):
        def sink(update):
            self.updates[i].append(update)
            if update.error is not None or update.finish_reason is not None:
                self.done[i].set()

        return sink

    def tokens(self, i):
        return [t.token for u in self.updates[i] for t in u.tokens]

    def end(self, i):
        return self.updates[i][-1] if self.updates[i] else None


def _wait(predicate, what: str) -> None:
    event = threading.Event()
    for _ in range(WAIT_S * 20):
        if predicate():
            return
        event.wait(0.05)
    pytest.fail(f"timed out waiting for {what}")


# -- one bad sequence --------------------------------------------------------------------------


class _FailingTokenizer:
    """Decodes as ``tok`` until its third token, then raises (a detokeniser's bug)."""

    def __init__(self, tok):
        self.tok = tok
        self.calls = 0

    def decode_bytes(self, ids, *, skip_special=False):
        self.calls += 1
        if self.calls >= 3:
            raise TokenizerError("injected: this token cannot be decoded")
        return self.tok.decode_bytes(ids, skip_special=skip_special)


class _FailingStops(TextTracker):
    """A stop-string matcher that raises on its second check."""

    checks = 0

    def _held_back(self):
        self.checks += 1
        if self.checks >= 2:
            raise IndexError("injected: the stop-string matcher failed")
        return super()._held_back()


def _failing_sink(collect):
    """An owner that vanishes after the first update (its event loop is gone)."""
    calls = []

    def sink(update):
        calls.append(update)
        if len(calls) >= 2:
            raise RuntimeError("injected: Event loop is closed")
        collect(update)

    return sink


GREEDY = SamplingParams(max_tokens=8, temperature=0, logprobs=0)


@pytest.mark.parametrize("fault", ["detokenize", "stop_strings", "sink", "device_setting"])
def test_one_failing_sequence_never_stops_the_engine(served, tok, fault):
    """A fault in one sequence among four ends that sequence only: the others get the same
    greedy tokens as a run without it, /health stays 200 and the next request succeeds."""
    engine, client = served
    normal = [(p, GREEDY, None, None) for p in PROMPTS]
    clean = _Run(engine, tok, normal)
    engine.submit(clean.seqs)
    _wait(lambda: all(d.is_set() for d in clean.done), "the fault-free run")

    bad_params = GREEDY
    if fault == "device_setting":  # passes the engine's Python, fails building device inputs
        bad_params = SamplingParams(max_tokens=8, temperature=0, logprobs=0, seed=2**40)
    bad = (
        PROMPTS[1],
        SamplingParams(max_tokens=8, temperature=0, logprobs=0, stop=("zz",))
        if fault == "stop_strings"
        else bad_params,
        _failing_sink if fault == "sink" else None,
        _FailingTokenizer(tok) if fault == "detokenize" else None,
    )
    run = _Run(engine, tok, [*normal, bad])
    if fault == "stop_strings":
        run.seqs[3].text = _FailingStops(tok, ("zz",))
    engine.submit(run.seqs)
    _wait(lambda: all(d.is_set() for d in run.done[:3]), "the other sequences")
    for i in range(3):
        assert run.tokens(i) == clean.tokens(i), i
        assert run.end(i).finish_reason == "length" and run.end(i).error is None
    if fault == "sink":  # nobody to tell: the sequence is cancelled and leaves its slot
        _wait(lambda: run.seqs[3].cancelled and not any(engine._sched.runs), "the slot to free")
    else:
        _wait(lambda: run.done[3].is_set(), "the failing sequence's error")
        assert "injected" in run.end(3).error or "out of bounds" in run.end(3).error
        assert run.seqs[3].finish_reason == "error"
    assert engine.healthy
    assert client.get("/health").json() == {"status": "ok"}
    r = _completion(client)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_device_failure_stops_the_engine_and_health_says_so(model, tok, monkeypatch):
    """A failing decode step (the device) does stop the engine: its request gets 500, /health
    and later requests 503."""

    def broken_step(*args, **kwargs):
        raise RuntimeError("injected: the device is gone")

    monkeypatch.setattr(batch, "decode_step", broken_step)
    engine = _engine(model, tok)
    app = create_app(engine, served_name=MODEL, metrics=engine.metrics)
    with TestClient(app) as client:
        r = _completion(client)
        assert r.status_code == 500 and "the device is gone" in r.json()["error"]["message"]
        health = client.get("/health")
        assert health.status_code == 503 and "the device is gone" in health.json()["error"]
        assert _completion(client).status_code == 503


def test_tokenizer_smaller_than_the_vocabulary_serves_replacement_text(model, tok, tmp_path):
    """The issue's reproduction: a tokenizer of 600 ids for the model's 2048. Ids it cannot
    decode come back as U+FFFD (text, logprobs, echo), nobody gets an error, and the server
    stays healthy."""
    data = json.loads((Path(builtin_dir()) / "tokenizer.tok.json").read_text())
    cut = 600
    data["regular_tokens"] = [e for e in data["regular_tokens"] if e["token"] < cut]
    path = tmp_path / "tokenizer.tok.json"
    path.write_text(json.dumps(data))  # keeps vocab_size 2048: ids cut..2047 are gaps
    gaps = ServedTokenizer(TokJsonTokenizer.from_file(path), model.config.vocab_size)
    assert gaps.mismatch() is not None and "1448 unassigned ids below 2048" in gaps.mismatch()
    assert gaps.id_to_piece(cut) == REPLACEMENT
    data.pop("vocab_size")
    path.write_text(json.dumps(data))
    small = TokJsonTokenizer.from_file(path)
    served_tok = ServedTokenizer(small, model.config.vocab_size)
    assert served_tok.mismatch() == (
        f"the tokenizer has {cut} ids and the model's vocabulary 2048: ids {cut}..2047 decode "
        "as U+FFFD"
    )
    assert served_tok.decode([cut, 72, 2047]) == REPLACEMENT + small.decode([72]) + REPLACEMENT
    engine = _engine(model, small)
    app = create_app(engine, served_name=MODEL, metrics=engine.metrics)
    with TestClient(app) as client:
        prompt = [cut + 1, 5, 2047]
        whole = _completion(client, prompt=prompt, max_tokens=24, echo=True).json()
        assert whole["choices"][0]["finish_reason"] == "length"
        assert whole["choices"][0]["text"].startswith(REPLACEMENT)
        body = {"prompt": prompt, "max_tokens": 24, "logprobs": 5, "stream": True}
        streamed = _completion(client, **body).text.splitlines()
        assert streamed[-2:] == ["data: [DONE]", ""]  # no error chunk
        assert not any(line.startswith('data: {"error"') for line in streamed)
        chat = client.post(  # 16 prompt tokens: the same prefill shape as the others
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
            | {"max_tokens": 24, "temperature": 0, "logprobs": True, "top_logprobs": 5},
        )
        assert chat.status_code == 200 and chat.json()["choices"][0]["finish_reason"]
        assert client.get("/health").json() == {"status": "ok"}


def test_a_huge_top_k_reaches_the_device_as_the_vocabulary(served):
    """top_k past int32 used to stop the engine while building the prefill's inputs."""
    engine, client = served
    r = _completion(client, top_k=2**40, temperature=0.5, seed=1)
    assert r.status_code == 200 and engine.healthy


# -- bounded requests ------------------------------------------------------------------------


def test_bodies_over_the_limit_get_413_before_they_are_read(served):
    engine, _ = served
    app = create_app(engine, served_name=MODEL, metrics=Metrics(4), max_body_bytes=1000)
    client = TestClient(app)  # no lifespan: nothing here reaches the engine
    body = json.dumps({"model": MODEL, "prompt": "x" * 2000}).encode()
    r = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "--max-body-bytes" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: counted while read
        for i in range(0, len(body), 100):
            yield body[i : i + 100]

    r = client.post("/v1/completions", content=chunked())
    assert r.status_code == 413
    _, default_limit = served
    r = default_limit.post("/v1/completions", content=b"[" * 100_000)  # too deep: a 400, not a 500
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_long_stop_strings_and_prompts_are_refused_before_tokenising(served, monkeypatch):
    engine, client = served
    r = _completion(client, stop=["x" * (MAX_STOP_CHARS + 1)])
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    assert _completion(client, stop=["x" * MAX_STOP_CHARS]).status_code == 200

    encoded = []
    inner = engine.tokenizer  # the app's ServedTokenizer wraps it and calls its encode
    monkeypatch.setattr(inner, "encode", lambda *a, **k: encoded.append(1) or [5])
    app = create_app(engine, served_name=MODEL, metrics=Metrics(4), max_body_bytes=2**26)
    big = TestClient(app)
    r = big.post("/v1/completions", json={"model": MODEL, "prompt": "x " * 10_000_000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    messages = [{"role": "user", "content": "x" * 20_000_000}]
    r = big.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    many = {"model": MODEL, "prompt": ["x"] * 13, "max_tokens": 1}  # 13 > 4 slots + 8 queued
    assert big.post("/v1/completions", json=many).json()["error"]["param"] == "n"
    assert encoded == []


# -- ignore_eos and min_tokens ---------------------------------------------------------------


def test_ignore_eos_and_min_tokens_are_validated(tok):
    served_tok = ServedTokenizer(tok, 2048)

    def parse(chat=False, **fields):
        body = {"model": MODEL, "max_tokens": 8, **fields}
        body |= {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
        return parse_generation(
            body, served_tok, chat=chat, served_name=MODEL, max_context=CONTEXT, vocab=2048
        )

    assert parse().params.stop_ids == {tok.eos_id} and parse().params.min_tokens == 0
    assert parse(ignore_eos=True).params.stop_ids == frozenset()
    assert parse(chat=True, ignore_eos=True).params.stop_ids == frozenset()
    assert parse(min_tokens=8).params.min_tokens == 8
    for fields in ({"min_tokens": 9}, {"min_tokens": -1}, {"min_tokens": 1.5}, {"ignore_eos": 1}):
        with pytest.raises(RequestError) as e:
            parse(**fields)
        assert e.value.param == next(iter(fields))


def _one(engine: Engine, tok, params: SamplingParams) -> _Run:
    run = _Run(engine, tok, [(PROMPTS[0], params, None, None)])
    engine.submit(run.seqs)
    _wait(run.done[0].is_set, "a sequence")
    return run


def test_min_tokens_suppresses_stop_tokens(served, tok):
    """PROMPTS[0]'s greedy tokens hold token t second and again after the fifth: as a stop
    token it ends the sequence at 2, or with min_tokens 5 at its next place."""
    engine, _ = served
    tokens = _one(engine, tok, SamplingParams(max_tokens=24, temperature=0, logprobs=0)).tokens(0)
    stop = tokens[1]
    later = tokens.index(stop, 5) + 1  # its 1-based place after the first five
    for min_tokens, ends_at in ((0, 2), (5, later)):
        params = SamplingParams(
            max_tokens=24, temperature=0, logprobs=0, min_tokens=min_tokens, stop_ids={stop}
        )
        end = _one(engine, tok, params).end(0)
        assert (end.finish_reason, end.num_tokens) == ("stop", ends_at), min_tokens


def test_min_tokens_suppresses_stop_strings(tok):
    """Stop strings are looked for only after the first min_tokens tokens' text."""
    ids = tok.encode("the end of it, the end again")
    k = next(k for k in range(1, len(ids)) if "end" in tok.decode(ids[:k]))
    for min_tokens, want in ((0, "the "), (k, "the end of it, the ")):
        t = TextTracker(tok, ["end"], min_tokens=min_tokens)
        emitted = ""
        for token in ids:
            t.push(token)
            emitted += t.take()
            if t.stopped:
                break
        assert (emitted, t.stopped) == (want, True), min_tokens


def test_held_back_tail_is_the_longest_stop_prefix():
    """The scan over first-character places finds what trying every tail length finds, on
    random texts and stop strings over a small alphabet (many partial matches)."""
    tok = load_tokenizer(builtin_dir())
    rng = random.Random(0)

    def word(lo: int, hi: int) -> str:
        return "".join(rng.choice("abc") for _ in range(rng.randint(lo, hi)))

    for _ in range(500):
        stops = [word(1, 6) for _ in range(rng.randint(1, 4))]
        text = word(0, 12)
        t = TextTracker(tok, stops)
        t.text = text
        longest = max(map(len, stops))
        want = next(
            (
                n
                for n in range(min(longest - 1, len(text)), 0, -1)
                if any(s.startswith(text[-n:]) for s in stops)
            ),
            0,
        )
        assert t._held_back() == want, (text, stops)


def test_protocol_keeps_retry_after_on_503():
    e = RequestError("busy", status=503, retry_after=1)
    assert e.headers() == {"Retry-After": "1"} and RequestError("bad").headers() is None


# -- SIGTERM: a real server process ----------------------------------------------------------

DRAIN_S = 4.0
STARTUP_S = 180


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _stream_lines(url: str, body: dict, lines: list[str], started: threading.Event) -> None:
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line:
                lines.append(line)
                started.set()
    lines.append(f"ended {time.monotonic()}")


@pytest.mark.slow
def test_sigterm_drains_and_exits_0(tmp_path):
    """A real server: a 100 MB upload gets 413 within a second (Content-Length or chunked);
    1 MB stop strings get 400 with the server's memory unchanged. Then SIGTERM while two
    streams and a whole request run and two clients sit idle on open connections: /health and
    new requests get 503 (Retry-After), the short stream finishes, what is still running at
    --drain-timeout ends with an error naming it, and the process exits 0 in time."""
    port = free_port()
    # One device, and the suite's fast compiler (see conftest.py): compiling is most of this.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = FAST_COMPILE_FLAGS
    cmd = [sys.executable, "-m", "grok.serve", "--port", str(port), "--max-batch", "8"]
    cmd += ["--dtype", "float32", "--drain-timeout", str(DRAIN_S)]
    log_path = tmp_path / "stderr.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_started(proc, base, log_path)
        _check_bounds_over_sockets(proc, port, base)
        _check_drain(proc, port, base)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=20)


def _wait_started(proc: subprocess.Popen, base: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"grok-serve exited with {proc.returncode}: {log_path.read_text()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    pytest.fail("grok-serve did not start in time")


def _check_bounds_over_sockets(proc: subprocess.Popen, port: int, base: str) -> None:
    for chunked in (False, True):
        status, seconds, _ = upload_100mb(port, chunked)
        assert status.startswith("HTTP/1.1 413") and seconds < 1.0, (chunked, status, seconds)
    body = {"model": MODEL, "prompt": "A", "max_tokens": 2, "stop": ["x" * 1_000_000]}
    with httpx.Client(timeout=60) as client:
        client.post(f"{base}/v1/completions", json=body)  # the first one's allocations
        before = _rss_kib(proc.pid)
        for _ in range(10):
            r = client.post(f"{base}/v1/completions", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
        assert _rss_kib(proc.pid) - before < 8 * 1024  # KiB: ten 1 MB bodies are not kept


def _queued(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return next(
        float(v.split()[-1]) for v in text.splitlines() if v.startswith("grok_queue_length ")
    )


def _check_drain(proc: subprocess.Popen, port: int, base: str) -> None:
    url = f"{base}/v1/completions"
    common = {"model": MODEL, "prompt": "A", "temperature": 0, "ignore_eos": True}
    idle = httpx.Client(timeout=60)
    steps = {**common, "max_tokens": 64, "n": 8}  # all 8 slots: compiles, then times a step
    assert idle.post(url, json=steps).status_code == 200
    start = time.monotonic()
    assert idle.post(url, json=steps).status_code == 200
    step_s = (time.monotonic() - start) / 64
    # The short stream takes a slot first and needs about half of DRAIN_S: it is running at
    # SIGTERM and finishes in the drain. Behind it 128 sequences of 480 tokens on 8 slots
    # (7680 steps) are far more than DRAIN_S of work.
    short = {**common, "max_tokens": min(480, max(8, int(0.5 * DRAIN_S / step_s))), "stream": True}
    whole = {**common, "prompt": ["A"] * 7, "max_tokens": 480, "n": 16}
    long = {**common, "max_tokens": 480, "n": 16, "stream": True}
    silent = socket.create_connection(("127.0.0.1", port))  # connected, never sends
    short_lines: list[str] = []
    long_lines: list[str] = []
    whole_result: list[httpx.Response] = []
    started = threading.Event()
    threads = [
        threading.Thread(target=_stream_lines, args=(url, short, short_lines, started)),
        threading.Thread(target=lambda: whole_result.append(httpx.post(url, json=whole))),
        threading.Thread(target=_stream_lines, args=(url, long, long_lines, threading.Event())),
    ]
    for thread, more in zip(threads, (0, 100, 8), strict=True):  # in this order, queued
        before = _queued(base)
        thread.start()
        deadline = time.monotonic() + 60
        while not (started.is_set() and _queued(base) >= before + more):
            assert time.monotonic() < deadline, "the requests did not queue in time"
            time.sleep(0.02)

    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(0.3)  # the drain starts within uvicorn's 0.1 s tick
    health = httpx.get(f"{base}/health", timeout=10)
    assert (health.status_code, health.json()) == (503, {"status": "draining"})
    refused = idle.post(url, json={**common, "max_tokens": 2})  # on the idle keep-alive one
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "shutting_down"

    assert proc.wait(timeout=DRAIN_S + 5) == 0
    assert time.monotonic() - signalled < DRAIN_S + 5
    for t in threads:
        t.join(timeout=10)
    idle.close()
    silent.close()
    # The short stream was running at SIGTERM, ran on, and finished.
    assert float(short_lines[-1].split()[-1]) > signalled and short_lines[-2] == "data: [DONE]"
    assert json.loads(short_lines[-3][len("data: ") :])["choices"][0]["finish_reason"] == "length"
    error = json.loads(long_lines[-2][len("data: ") :])["error"]
    assert "--drain-timeout" in error["message"]
    assert whole_result[0].status_code == 503
    assert "--drain-timeout" in whole_result[0].json()["error"]["message"]
