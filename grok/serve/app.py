"""The ASGI application (Starlette): OpenAI's endpoints in front of the batching engine.

Requests are validated and tokenised here, on the event loop, then queued to the engine; the
engine thread hands each sequence's ``Update``s back through ``loop.call_soon_threadsafe``.
A client that goes away (a dropped stream, or a closed connection while waiting for a whole
response) cancels its sequences, which leave their slots before the next decode step.

Every request is bounded before any work: its body (``max_body_bytes``, 413, checked against
Content-Length before reading and while reading), then its fields and its prompt's size
(``grok.serve.protocol``). An error in one request or sequence ends that one only (a 500, or
an error chunk in a stream); ``/health`` is 503 only when the engine has stopped or the server
is draining (``grok.serve.drain``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from grok.errors import GenerationError
from grok.serve import protocol
from grok.serve.drain import DEFAULT_DRAIN_TIMEOUT_S, RETRY_AFTER_S, Drain
from grok.serve.engine import Engine, QueueFull
from grok.serve.metrics import Metrics
from grok.serve.protocol import GenerationRequest, RequestError
from grok.serve.sequence import SequenceRequest, Update
from grok.serve.text import ServedTokenizer

log = logging.getLogger("grok.serve")

Handler = Callable[[Request], Awaitable[Response]]

# The largest request body read: a --max-context prompt as JSON ids is ~7 bytes a token
# (8192 tokens: 57 KB; 131072: 0.9 MB), so 16 MiB holds the default queue's worth of long
# prompts in one request while a 100 MB upload is refused before it is read.
DEFAULT_MAX_BODY_BYTES = 16 * 2**20


def _error(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


class _Choice:
    """What one sequence has produced so far (for a whole, non-streamed response)."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.tokens: list[Any] = []
        self.prompt_tokens: Any = None
        self.finish_reason: str | None = None
        self.num_tokens = 0

    def add(self, u: Update) -> None:
        self.text.append(u.text)
        self.tokens.extend(u.tokens)
        if u.prompt_tokens is not None:
            self.prompt_tokens = u.prompt_tokens
        self.finish_reason = u.finish_reason
        self.num_tokens = u.num_tokens


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _Routes:
    """The app's handlers, each a method of its own, around one engine.

    Every handler goes through ``endpoint`` (authorisation, OpenAI-style errors, the request
    counter); with ``api_key``, every /v1 request and /metrics needs
    ``Authorization: Bearer KEY`` (/health stays open for liveness probes).
    """

    def __init__(
        self,
        engine: Engine,
        served_name: str,
        api_key: str | None,
        metrics: Metrics,
        *,
        max_body_bytes: int,
        drain: Drain,
    ):
        self.engine = engine
        self.served_name = served_name
        self.api_key = api_key
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.drain = drain
        self.tokenizer = ServedTokenizer.wrap(engine.tokenizer, engine.model.config.vocab_size)
        self.created = int(time.time())

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise RequestError(
                "Incorrect API key provided: pass it as 'Authorization: Bearer KEY'",
                status=401,
                code="invalid_api_key",
            )

    def endpoint(self, name: str, fn: Handler, *, auth: bool = True) -> Handler:
        """``fn`` with authorisation, OpenAI-style errors and the request counter."""

        async def handler(request: Request) -> Response:
            try:
                if auth:
                    self.authorize(request)
                response = await fn(request)
            except RequestError as e:
                response = _error(e)
            except Exception as e:  # answer 500 and keep serving
                log.exception("request to %s failed", name)
                response = _error(
                    RequestError(f"internal error: {e}", status=500, type="server_error")
                )
            self.metrics.request(name, response.status_code)
            return response

        return handler

    async def health(self, _: Request) -> Response:
        """200 while the engine serves; 503 when it has stopped (after a device-level error)
        or the server is draining."""
        engine = self.engine
        if not engine.healthy:
            return JSONResponse({"status": "error", "error": str(engine.error)}, status_code=503)
        if self.drain.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def models(self, _: Request) -> Response:
        card = {
            "id": self.served_name,
            "object": "model",
            "created": self.created,
            "owned_by": "grok",
            "max_model_len": self.engine.max_context,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def metrics_text(self, _: Request) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    async def completions(self, request: Request) -> Response:
        return await self.generation(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self.generation(request, chat=True)

    async def generation(self, request: Request, *, chat: bool) -> Response:
        """A completion (or chat completion): parsed, queued, then streamed or answered whole."""
        engine, tokenizer = self.engine, self.tokenizer
        self.drain.admit()
        req = protocol.parse_generation(
            await _read_json(request, self.max_body_bytes),
            tokenizer,
            chat=chat,
            served_name=self.served_name,
            max_context=engine.max_context,
            vocab=engine.model.config.vocab_size,
            max_sequences=engine.max_batch + engine.max_queue,
            max_prompt_chars=engine.max_context * tokenizer.max_token_chars,
        )
        seqs, updates = self.submit(req)
        self.metrics.prompt_tokens.inc(sum(len(p) for p in req.prompts))
        request_id = protocol.new_id(chat)
        if req.stream:
            stream = _stream(req, seqs, updates, request_id, self.served_name, tokenizer)
            return StreamingResponse(
                stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        try:
            return await _whole(
                request, req, seqs, updates, request_id, self.served_name, tokenizer
            )
        except RequestError as e:
            if e.status == 500 and self.drain.draining:  # ended by the drain's deadline
                raise RequestError(
                    str(e), status=503, type="server_error", retry_after=RETRY_AFTER_S
                ) from None
            raise

    def submit(self, req: GenerationRequest) -> tuple[list[SequenceRequest], asyncio.Queue[Update]]:
        """Queues the request's sequences (prompts x n) to the engine; their updates arrive on
        the returned queue (the engine thread hands them to this event loop)."""
        engine = self.engine
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[Update] = asyncio.Queue()

        def sink(u: Update) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(updates.put_nowait, u)

        seqs = [
            SequenceRequest(prompt, req.params, sink, self.tokenizer, index=p * req.n + c)
            for p, prompt in enumerate(req.prompts)
            for c in range(req.n)
        ]
        self.drain.admit()  # parsing awaited the body: the drain may have begun since
        try:
            engine.submit(seqs)
        except QueueFull as e:
            raise RequestError(
                str(e),
                status=503,
                type="server_error",
                code="overloaded",
                retry_after=RETRY_AFTER_S,
            ) from None
        except GenerationError as e:
            raise RequestError(str(e), status=503, type="server_error") from None
        self.drain.track(seqs, updates)
        return seqs, updates

    async def not_found(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
        message = f"{request.method} {request.url.path}: {detail}"
        body = protocol.error_body(message, protocol.INVALID_REQUEST)
        self.metrics.request("other", status)
        return JSONResponse(body, status_code=status)

    @contextlib.asynccontextmanager
    async def lifespan(self, _: Starlette) -> AsyncIterator[None]:
        self.engine.start()
        try:
            yield
        finally:
            self.engine.stop()


def _too_large(size: str, limit: int) -> RequestError:
    return RequestError(
        f"the request body has {size} bytes; this server reads at most {limit} (--max-body-bytes)",
        status=413,
        code="request_too_large",
    )


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, at most ``limit`` bytes: 413 from Content-Length before anything is read,
    or as soon as a body without one (chunked) passes the limit."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(f"Content-Length {declared[:40]!r} is not a number")
        if int(declared) > limit:
            raise _too_large(declared, limit)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _too_large("more than " + str(limit), limit)
    except ClientDisconnect:  # nobody reads the answer; nginx's code for it
        raise RequestError("the client closed the connection", status=499) from None
    return bytes(body)


async def _read_json(request: Request, limit: int) -> Any:
    raw = await _read_body(request, limit)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, deep nesting
        raise RequestError(f"the request body is not valid JSON: {e}") from None


def create_app(
    engine: Engine,
    *,
    served_name: str,
    api_key: str | None = None,
    metrics: Metrics,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S,
) -> Starlette:
    """The Starlette app serving ``engine`` as ``served_name``.

    With ``api_key``, every /v1 request and /metrics needs ``Authorization: Bearer KEY``
    (/health stays open for liveness probes). Request bodies over ``max_body_bytes`` get 413.
    ``app.state.drain`` is the app's ``Drain`` (``drain_timeout`` seconds), which
    ``grok.serve.drain.serve`` runs on SIGTERM.
    """
    drain = Drain(engine, drain_timeout)
    r = _Routes(engine, served_name, api_key, metrics, max_body_bytes=max_body_bytes, drain=drain)
    routes = [
        Route("/health", r.endpoint("health", r.health, auth=False), methods=["GET"]),
        Route("/v1/models", r.endpoint("models", r.models), methods=["GET"]),
        Route("/metrics", r.endpoint("metrics", r.metrics_text), methods=["GET"]),
        Route("/v1/completions", r.endpoint("completions", r.completions), methods=["POST"]),
        Route("/v1/chat/completions", r.endpoint("chat", r.chat), methods=["POST"]),
    ]
    app = Starlette(
        routes=routes, exception_handlers={HTTPException: r.not_found}, lifespan=r.lifespan
    )
    app.state.drain = drain
    return app


def _cancel_all(seqs: list[SequenceRequest]) -> None:
    for seq in seqs:
        if seq.finish_reason is None:
            seq.cancel()


async def _whole(
    request: Request,
    req: GenerationRequest,
    seqs: list[SequenceRequest],
    updates: asyncio.Queue[Update],
    request_id: str,
    model: str,
    tokenizer: Any,
) -> Response:
    """Waits for every sequence, then answers one JSON body (or nothing if the client left)."""
    choices = [_Choice() for _ in seqs]

    async def collect() -> str | None:
        remaining = len(seqs)
        while remaining:
            u = await updates.get()
            if u.error is not None:
                return u.error
            choices[u.index].add(u)
            remaining -= u.finish_reason is not None
        return None

    gone = asyncio.ensure_future(_wait_for_disconnect(request))
    work = asyncio.ensure_future(collect())
    try:
        await asyncio.wait({gone, work}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler itself is cancelled (server shutdown)
        gone.cancel()
        if not work.done():
            work.cancel()
            _cancel_all(seqs)
    if not work.done() or work.cancelled():
        return Response(status_code=499)  # the client is gone; nobody reads this
    if work.result() is not None:
        raise RequestError(work.result(), status=500, type="server_error")

    out = [
        _whole_choice(req, seq, choice, tokenizer)
        for seq, choice in zip(seqs, choices, strict=True)
    ]
    prompt_tokens = sum(len(p) for p in req.prompts)
    completion_tokens = sum(c.num_tokens for c in choices)
    body = protocol.envelope(request_id, req.chat, model, chunk=False)
    body["choices"] = out
    body["usage"] = protocol.usage(prompt_tokens, completion_tokens)
    return JSONResponse(body)


def _whole_choice(
    req: GenerationRequest, seq: SequenceRequest, choice: _Choice, tokenizer: Any
) -> dict[str, Any]:
    """One choice of a whole response: its text (or message) and logprobs."""
    text = "".join(choice.text)
    prompt_text = tokenizer.decode(seq.prompt) if req.echo else ""
    item: dict[str, Any] = {"index": seq.index}
    logprobs = None
    if req.chat:
        item["message"] = {"role": "assistant", "content": text}
        if req.logprobs is not None:
            logprobs = protocol.chat_logprobs(tokenizer, choice.tokens)
    else:
        item["text"] = prompt_text + text
        if req.logprobs is not None:
            infos = list(choice.tokens)
            if req.echo and choice.prompt_tokens is not None:
                prompt_infos = protocol.prompt_token_infos(tokenizer, choice.prompt_tokens)
                logprobs = protocol.completion_logprobs(tokenizer, prompt_infos)
                rest = protocol.completion_logprobs(tokenizer, infos, len(prompt_text))
                for key in logprobs:
                    logprobs[key] += rest[key]
            else:
                logprobs = protocol.completion_logprobs(tokenizer, infos, len(prompt_text))
    item["logprobs"] = logprobs
    item["finish_reason"] = choice.finish_reason
    return item


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _stream(
    req: GenerationRequest,
    seqs: list[SequenceRequest],
    updates: asyncio.Queue[Update],
    request_id: str,
    model: str,
    tokenizer: Any,
) -> AsyncIterator[str]:
    """Server-sent events: a chunk per update, a usage chunk when asked, ``data: [DONE]``.

    When the client disconnects, the server stops iterating this generator; ``finally``
    then cancels the sequences still running.
    """

    def chunk(index: int, piece: dict[str, Any], finish: str | None) -> dict[str, Any]:
        body = protocol.envelope(request_id, req.chat, model, chunk=True)
        body["choices"] = [{"index": index, **piece, "finish_reason": finish}]
        if req.include_usage:
            body["usage"] = None
        return body

    completion_tokens = [0] * len(seqs)
    try:
        async for event in _events(req, seqs, updates, chunk, completion_tokens, tokenizer):
            yield event
        if req.include_usage:
            body = protocol.envelope(request_id, req.chat, model, chunk=True)
            body["choices"] = []
            prompt_tokens = sum(len(p) for p in req.prompts)
            body["usage"] = protocol.usage(prompt_tokens, sum(completion_tokens))
            yield _sse(body)
        yield "data: [DONE]\n\n"
    except _StreamError as e:
        yield _sse(protocol.error_body(str(e), "server_error"))
    except Exception as e:  # this stream only: an error chunk, the server goes on
        log.exception("a stream failed")
        yield _sse(protocol.error_body(f"internal error: {e!r}", "server_error"))
    finally:
        _cancel_all(seqs)


class _StreamError(Exception):
    """A sequence of the stream ended with an error (the engine's message)."""


async def _events(
    req: GenerationRequest,
    seqs: list[SequenceRequest],
    updates: asyncio.Queue[Update],
    chunk: Callable[[int, dict[str, Any], str | None], dict[str, Any]],
    completion_tokens: list[int],
    tokenizer: Any,
) -> AsyncIterator[str]:
    """The stream's chunks from the opening pieces to every sequence's last update;
    ``_StreamError`` when a sequence ends with an error."""
    for seq in seqs:
        opening = _opening_piece(req, seq, tokenizer)
        if opening is not None:
            yield _sse(chunk(seq.index, opening, None))
    remaining = len(seqs)
    while remaining:
        u = await updates.get()
        if u.error is not None:
            raise _StreamError(u.error)
        remaining -= u.finish_reason is not None
        completion_tokens[u.index] = u.num_tokens
        for piece, finish in _update_pieces(req, seqs[u.index], u, tokenizer):
            yield _sse(chunk(u.index, piece, finish))


def _opening_piece(
    req: GenerationRequest, seq: SequenceRequest, tokenizer: Any
) -> dict[str, Any] | None:
    """A sequence's first chunk before any token: the assistant's role (chat), or the echoed
    prompt (echo without prompt logprobs, which then come with the first update)."""
    if req.chat:
        return {"delta": {"role": "assistant", "content": ""}, "logprobs": None}
    if req.echo and not req.params.prompt_logprobs:
        return {"text": tokenizer.decode(seq.prompt), "logprobs": None}
    return None


def _update_pieces(
    req: GenerationRequest, seq: SequenceRequest, u: Update, tokenizer: Any
) -> list[tuple[dict[str, Any], str | None]]:
    """The chunks (piece, finish reason) of one update: the prompt first when it brings the
    prompt's logprobs (echo), then its text and logprobs, unless it carries nothing."""
    pieces: list[tuple[dict[str, Any], str | None]] = []
    offset = 0
    if u.prompt_tokens is not None:  # echo with logprobs: the prompt comes first
        prompt_text = tokenizer.decode(seq.prompt)
        offset = len(prompt_text)
        infos = protocol.prompt_token_infos(tokenizer, u.prompt_tokens)
        prompt_chunk = protocol.completion_logprobs(tokenizer, infos)
        pieces.append(({"text": prompt_text, "logprobs": prompt_chunk}, None))
    elif req.echo:
        offset = len(tokenizer.decode(seq.prompt))
    logprobs = None
    if req.logprobs is not None and u.tokens:
        if req.chat:
            logprobs = protocol.chat_logprobs(tokenizer, u.tokens)
        else:
            logprobs = protocol.completion_logprobs(tokenizer, u.tokens, offset)
    if not u.text and logprobs is None and u.finish_reason is None:
        return pieces
    if req.chat:
        piece = {"delta": {"content": u.text} if u.text else {}, "logprobs": logprobs}
    else:
        piece = {"text": u.text, "logprobs": logprobs}
    pieces.append((piece, u.finish_reason))
    return pieces


__all__ = ["create_app"]
