"""grok-serve end to end: a real server subprocess with the built-in model, the openai client.

One server for the module (starting it and compiling its steps is most of the cost). Texts are
compared with ``Model.generate`` run in this process on the same model and prompts; the server
decodes 8 rows at once while ``generate`` decodes one, so equal greedy text shows that rows do
not disturb each other. Both compute in float32: in bfloat16 the two paths' different
summation orders flip near-ties (seen: two tokens 0.008 nats apart). Everything talks to
127.0.0.1 only, and every wait is bounded.
"""

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from conftest import FAST_COMPILE_FLAGS
from starlette.testclient import TestClient

import grok
from grok.bench.harness import free_port, stop_process
from grok.builtin import builtin_dir
from grok.kernels.cpu import CpuKernels
from grok.sampling import Sampler
from grok.serve import cli as serve_cli
from grok.serve.app import create_app
from grok.serve.engine import Engine
from grok.serve.metrics import Metrics
from grok.serve.protocol import RequestError, _prompt_ids
from grok.serve.sampler import RowSettings, penalized, sample_rows
from grok.serve.sequence import SamplingParams, SequenceRequest
from grok.serve.text import TextTracker
from grok.tokenizer import chat_stop_ids, encode_chat, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
MODEL = "grok-builtin"
KEY = "test-key"
MAX_TOKENS = 24  # one cache bucket for every reference generate call
STARTUP_S = 180  # bound on the server's start (import, load) on a busy machine
PROMPTS = ["A class definition", "The for statement", "Exceptions are raised when"]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "GROK_API_KEY": KEY}
    env["XLA_FLAGS"] = FAST_COMPILE_FLAGS  # one device is all the server uses
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "grok.serve",
            "--port",
            str(port),
            "--max-batch",
            "8",
            "--dtype",
            "float32",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"grok-serve exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("grok-serve did not start in time")
        time.sleep(0.2)
    yield base, proc
    stop_process(proc, timeout=20)


@pytest.fixture(scope="module")
def client(server):
    base, _ = server
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference():
    """(model, tokenizer, greedy(ids) -> (tokens, finish)) for Model.generate's answers."""
    model = grok.load_pretrained("builtin", dtype=jnp.float32, quiet=True)
    tok = load_tokenizer(builtin_dir())

    def greedy(ids, stops):
        r = model.generate([ids], max_new_tokens=MAX_TOKENS, stop_tokens=stops)
        return r.tokens[0], r.finish_reasons[0]

    return model, tok, greedy


def test_health_and_models(server, client):
    base, _ = server
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_greedy_equals_generate(client, reference):
    _, tok, greedy = reference
    ids = tok.encode(PROMPTS[0])
    want, _ = greedy(ids, [tok.eos_id])
    r = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0
    )
    assert r.choices[0].text == tok.decode(want)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), MAX_TOKENS)
    assert r.usage.total_tokens == len(ids) + MAX_TOKENS
    # Token ids as the prompt give the same completion; streamed pieces join to it.
    by_ids = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=MAX_TOKENS, temperature=0
    )
    assert by_ids.choices[0].text == r.choices[0].text
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPTS[0],
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_chat_equals_generate(client, reference):
    _, tok, greedy = reference
    messages = [{"role": "user", "content": "Classes?"}]  # 16 tokens: one prompt bucket
    want, reason = greedy(encode_chat(tok, messages), chat_stop_ids(tok))
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tok.decode(want)
    assert r.choices[0].finish_reason == reason
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == tok.decode(want)
    assert chunks[-1].choices[0].finish_reason == reason


def test_32_concurrent_requests(client, reference):
    """Greedy text equals generate's and seeded samples repeat while 31 others run."""
    _, tok, greedy = reference
    target_ids = tok.encode(PROMPTS[1])
    want = tok.decode(greedy(target_ids, [tok.eos_id])[0])
    seeded = {"prompt": PROMPTS[2], "temperature": 0.9, "top_p": 0.95, "seed": 7}
    alone = client.completions.create(model=MODEL, max_tokens=MAX_TOKENS, **seeded)

    def ask(i):
        if i == 0:
            kw = {"prompt": PROMPTS[1], "temperature": 0, "max_tokens": MAX_TOKENS}
        elif i == 1:
            kw = {**seeded, "max_tokens": MAX_TOKENS}
        else:  # mixed prompt lengths, budgets and settings
            prompt = " ".join(["The import statement"] * (1 + i % 4))  # 3 to 12 tokens
            kw = {"prompt": prompt, "max_tokens": 4 + (i * 7) % 40, "temperature": (i % 3) / 2}
            kw.update(seed=i, top_k=(i % 4) * 10, frequency_penalty=(i % 5) / 4)
            kw = {"extra_body": {"top_k": kw.pop("top_k")}, **kw}
        return kw, client.completions.create(model=MODEL, **kw)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(ask, range(32)))
    assert results[0][1].choices[0].text == want
    assert results[1][1].choices[0].text == alone.choices[0].text
    for kw, r in results:
        choice = r.choices[0]
        assert choice.finish_reason in ("stop", "length")
        if choice.finish_reason == "length":  # answered in full
            assert r.usage.completion_tokens == kw["max_tokens"]
        else:
            assert r.usage.completion_tokens <= kw["max_tokens"]


def test_stop_string_across_tokens(client, reference):
    _, tok, greedy = reference
    tokens, _ = greedy(tok.encode(PROMPTS[0]), [tok.eos_id])
    pieces = [tok.decode([t]) for t in tokens]
    # A stop string made of the end of token 3 and the start of token 4.
    k = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) > 1 and pieces[i + 1])
    stop = pieces[k][-2:] + pieces[k + 1][:1]
    full = "".join(pieces)
    want = full[: full.index(stop)]
    kw = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0}
    r = client.completions.create(stop=[stop, "never appears"], **kw)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    streamed = list(client.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == want
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_logprobs_echo_n_and_prompt_lists(client, reference):
    _, tok, _ = reference
    r = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    lp = r.choices[0].logprobs
    n_prompt = len(tok.encode(PROMPTS[0]))
    assert r.choices[0].text.startswith(PROMPTS[0])
    assert len(lp.tokens) == n_prompt + 3 and lp.token_logprobs[0] is None
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    # Greedy picks the most likely token: its logprob is the best alternative's.
    assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()))
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        logprobs=True,
        top_logprobs=3,
        seed=1,
    )
    assert [len(t.top_logprobs) for t in chat.choices[0].logprobs.content] == [3, 3]
    many = client.completions.create(
        model=MODEL, prompt=PROMPTS[:2], n=2, max_tokens=5, temperature=1.0, seed=3
    )
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    prompt_tokens = sum(len(tok.encode(p)) for p in PROMPTS[:2])
    assert many.usage.prompt_tokens == prompt_tokens
    assert many.usage.completion_tokens == sum(5 for _ in many.choices)
    again = client.completions.create(
        model=MODEL, prompt=PROMPTS[:2], n=2, max_tokens=5, temperature=1.0, seed=3
    )
    assert [c.text for c in again.choices] == [c.text for c in many.choices]


def test_bad_requests_get_openai_errors(server, client):
    base, proc = server
    bad = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    cases = [
        {"temperature": "hot"},
        {"max_tokens": True},
        {"logprobs": 6},
        {"prompt": [5, 999999]},
        {"prompt": 12},
        {"stop": [1]},
        {"max_tokens": 600},  # 512-token context
    ]
    for fields in cases:
        body = {"model": MODEL, "prompt": "x", **fields}
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(
                **{k: v for k, v in body.items() if k != "prompt"}, prompt=body["prompt"]
            )
        assert e.value.status_code == 400, fields
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{base}/v1/chat/completions", content=b"{not json", headers=headers)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(
        f"{base}/v1/chat/completions", json={"model": MODEL, "messages": "hi"}, headers=headers
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert httpx.get(f"{base}/nowhere").json()["error"]["message"].endswith("Not Found")
    assert proc.poll() is None
    assert httpx.get(f"{base}/health").status_code == 200


def _metric(text: str, name: str) -> float:
    """The value of the sample ``name`` (with its labels) in Prometheus text, 0 if absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_disconnect_frees_slot(server):
    """A dropped stream and a client that gives up on a whole response both free their slot.

    Sampling at temperature 1 may draw the end-of-sequence token before the client hangs up, so
    a try counts only when the sequence left its slot as cancelled; a few tries make that sure.
    """
    base, _ = server
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": "A", "max_tokens": 500, "temperature": 1}
    reasons = ("cancelled", "stop", "length")

    def metrics() -> str:
        return httpx.get(f"{base}/metrics", headers=headers).text

    def finished(text: str) -> dict[str, float]:
        return {r: _metric(text, f'grok_sequences_finished_total{{reason="{r}"}}') for r in reasons}

    def wait_for(condition) -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = metrics()
            if condition(text):
                return text
            time.sleep(0.05)
        pytest.fail(f"timed out waiting on the metrics:\n{text}")

    def dropped(hang_up) -> str:
        """Runs ``hang_up`` until the sequence it starts ends as cancelled; the final metrics."""
        for _ in range(5):
            before = finished(metrics())

            def ended(t: str, before=before) -> bool:
                return sum(finished(t).values()) > sum(before.values())

            hang_up(ended)
            text = wait_for(lambda t: ended(t) and _metric(t, "grok_batch_occupancy") == 0)
            if finished(text)["cancelled"] > before["cancelled"]:
                return text
        pytest.fail(f"no try ended as cancelled:\n{text}")

    def stream(_ended) -> None:
        with httpx.stream(
            "POST", f"{base}/v1/completions", json={**body, "stream": True}, headers=headers
        ) as r:
            next(r.iter_lines())  # generation has started

    def whole(ended) -> None:
        payload = json.dumps(body).encode()
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            raw.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            wait_for(lambda t: _metric(t, "grok_batch_occupancy") >= 1 or ended(t))  # hang up

    dropped(stream)
    text = dropped(whole)
    assert "grok_time_to_first_token_seconds_bucket" in text
    assert 'status="500"' not in text
    assert httpx.get(f"{base}/metrics").status_code == 401  # the key guards metrics too


def test_server_healthy_at_the_end(server, client):
    base, proc = server
    assert proc.poll() is None
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    r = client.completions.create(model=MODEL, prompt="A", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


# -- in-process pieces -----------------------------------------------------------------------


def test_full_queue_answers_503():
    """One slot and one queue place, one sequence already waiting (the engine is not started):
    a request for two more sequences has no room now (503); one for three never fits (400)."""
    model = grok.load_pretrained("builtin", quiet=True)
    tok = load_tokenizer(builtin_dir())
    engine = Engine(model, tok, max_batch=1, max_queue=1)
    engine.submit([SequenceRequest([1], SamplingParams(max_tokens=1), lambda u: None, tok)])
    app = create_app(engine, served_name=MODEL, metrics=Metrics(1))
    r = TestClient(app).post(
        "/v1/completions", json={"model": MODEL, "prompt": "x", "n": 2, "max_tokens": 2}
    )
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
    r = TestClient(app).post(  # more than the server could ever hold: the request is wrong
        "/v1/completions", json={"model": MODEL, "prompt": "x", "n": 3, "max_tokens": 2}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_row_sampler():
    """Per-row settings: greedy rows match argmax of the penalised logits; a row's draw does
    not depend on the other rows; top_k 1 is greedy at any temperature."""
    v = 64
    logits = jax.random.normal(jax.random.key(0), (4, v)) * 1.5  # [B, V]
    counts = jnp.zeros((4, v), jnp.int32).at[0, jnp.argmax(logits[0])].set(2)
    s = RowSettings(
        temperature=jnp.array([0.0, 1.0, 0.7, 5.0]),
        top_k=jnp.array([0, 0, 1, 8], jnp.int32),
        top_p=jnp.array([1.0, 0.9, 1.0, 1.0]),
        min_p=jnp.array([0.0, 0.0, 0.0, 0.1]),
        presence_penalty=jnp.array([0.5, 0.0, 0.0, 0.0]),
        frequency_penalty=jnp.array([10.0, 0.0, 0.0, 0.0]),
    )
    keys = jax.vmap(jax.random.key)(jnp.arange(4, dtype=jnp.uint32))
    counters = jnp.zeros((4,), jnp.int32)
    sample = jax.jit(sample_rows)
    draw = sample(logits, counts, s, keys, counters)
    pen = penalized(logits, counts, s)
    assert float(pen[0, jnp.argmax(logits[0])]) == pytest.approx(float(logits[0].max()) - 20.5)
    assert int(draw.token[0]) == int(jnp.argmax(pen[0])) != int(jnp.argmax(logits[0]))
    assert int(draw.token[2]) == int(jnp.argmax(logits[2]))
    assert int(draw.token[3]) in set(np.argsort(-np.asarray(logits[3]))[:8].tolist())
    shuffled = sample(
        logits[::-1], counts[::-1], jax.tree.map(lambda a: a[::-1], s), keys[::-1], counters
    )
    assert np.array_equal(np.asarray(shuffled.token[::-1]), np.asarray(draw.token))
    # Row 1 (temperature 1, top_p 0.9) only draws what grok.sampling.Sampler would allow.
    allowed = np.isfinite(np.asarray(Sampler(temperature=1.0, top_p=0.9).filtered_logits(logits)))
    seen = {int(sample(logits, counts, s, keys, counters + c).token[1]) for c in range(20)}
    assert len(seen) > 1 and all(allowed[1, t] for t in seen)


def test_text_tracker_holds_back_partial_stops():
    tok = load_tokenizer(builtin_dir())
    t = TextTracker(tok, ["of it"])
    emitted = ""
    for i in tok.encode("the end of it, and more"):
        t.push(i)
        emitted += t.take()
        assert "the end ".startswith(emitted)  # "o", "of", "of i" wait for the next token
        if t.stopped:
            break
    assert emitted == "the end " and t.stopped
    # A tail that might start a stop string is released when the sequence ends.
    t = TextTracker(tok, ["zzz"])
    for i in tok.encode("jazz"):
        t.push(i)
    assert t.take() == "ja"
    t.finish()
    assert t.take() == "zz" and not t.stopped


def test_cli_bad_flags_are_one_line_errors(tmp_path, capsys):
    assert serve_cli.main(["--checkpoint", str(tmp_path / "missing")]) == 2
    with pytest.raises(SystemExit) as e:
        serve_cli.main(["--max-batch", "0"])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("grok-serve: error: ") for line in lines)
    assert "not a directory" in lines[0] and "--max-batch" in lines[1]


def test_token_id_prompts_go_through_the_library_token_check():
    assert _prompt_ids({"prompt": [[1, 2], [3]]}, None, 256) == [[1, 2], [3]]
    for prompt, message in (
        ([5, 300], "token id 300 is outside the vocabulary [0, 256)"),
        ([[3, 2**40]], "outside the vocabulary"),
        ([[1, 2], []], "is empty"),
    ):
        with pytest.raises(
            RequestError, match=message.replace("[", r"\[").replace(")", r"\)")
        ) as e:
            _prompt_ids({"prompt": prompt}, None, 256)
        assert e.value.param == "prompt"


def test_bfloat16_engine_greedy_equals_generate():
    """The engine holds a bf16 cache in the kernels' carried form between steps
    (``Kernels.carry``: uint16 bits on the native CPU kernels): two prompts decoded side by
    side give Model.generate's greedy tokens."""
    model = grok.load_pretrained("builtin", dtype=jnp.bfloat16, quiet=True)
    tok = load_tokenizer(builtin_dir())
    prompts = [tok.encode(p) for p in PROMPTS[:2]]
    want = model.generate(prompts, max_new_tokens=8).tokens
    engine = Engine(model, tok, max_batch=2, max_queue=2)
    carried = jnp.uint16 if isinstance(model.kernels, CpuKernels) else jnp.bfloat16
    assert engine._state.cache.k.dtype == carried  # on the CPU kernels, bits: not a bf16 copy
    got: dict[int, list[int]] = {0: [], 1: []}
    done = threading.Event()

    def sink_for(i):
        def sink(update):
            got[i].extend(t.token for t in update.tokens)
            if update.finish_reason is not None and all(len(v) == 8 for v in got.values()):
                done.set()

        return sink

    params = SamplingParams(max_tokens=8, temperature=0, logprobs=0)
    engine.start()
    try:
        engine.submit([SequenceRequest(p, params, sink_for(i), tok) for i, p in enumerate(prompts)])
        assert done.wait(120)
    finally:
        engine.stop()
    assert [got[0], got[1]] == [list(w) for w in want]


def test_non_finite_logits_end_the_sequence_with_an_error():
    """A broken weight (NaN): the sequence ends with an error update (no tokens), its slot is
    freed and the engine keeps serving."""
    model = grok.load_pretrained("builtin", dtype=jnp.float32, quiet=True)
    params = {m: dict(t) for m, t in model.params.items()}
    params["grok/final_norm"]["weight"] = jnp.full_like(
        params["grok/final_norm"]["weight"], jnp.nan
    )
    broken = grok.Model(model.config, params, dtype=jnp.float32)
    tok = load_tokenizer(builtin_dir())
    updates = []
    done = threading.Event()

    def sink(update):
        updates.append(update)
        if update.error is not None or update.finish_reason is not None:
            done.set()

    metrics = Metrics(1)
    engine = Engine(broken, tok, max_batch=1, max_queue=1, metrics=metrics)
    engine.start()
    try:
        engine.submit([SequenceRequest([1, 2, 3], SamplingParams(max_tokens=4), sink, tok)])
        assert done.wait(120)
        assert engine.healthy
    finally:
        engine.stop()
    assert len(updates) == 1 and "non-finite logits" in updates[0].error
    text = metrics.render()[0].decode()
    assert 'grok_sequences_finished_total{reason="error"} 1.0' in text
    assert "grok_batch_occupancy 0.0" in text
