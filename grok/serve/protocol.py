"""OpenAI's request and response shapes: validation to OpenAI-style errors, response bodies.

Validation is written out field by field rather than with a schema library: each field's
rules (a bool is not an int, ``prompt`` is a string, strings, ids or lists of ids, ``stop``
a string or strings) map to one OpenAI-style error naming the field, which generic schema
errors would need translating into anyway.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from grok.errors import GrokError, TokenizerError
from grok.generate import MAX_SEED
from grok.serve.sampler import TOP_LOGPROBS
from grok.serve.sequence import SamplingParams, TokenInfo
from grok.tokenizer import Tokenizer, chat_stop_ids, encode_chat
from grok.tokens import check_token_ids

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_N = 16  # choices per prompt
MAX_STOP = 16  # stop strings per request
# Characters per stop string: real ones are a few ("\n\n", "Human:"); each token's check of
# the held-back tail scales with the longest, so a 1 MB one is refused rather than run.
MAX_STOP_CHARS = 1024

INVALID_REQUEST = "invalid_request_error"


class RequestError(GrokError):
    """A request the server refuses, answered as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = INVALID_REQUEST,  # noqa: A002  (OpenAI's field name)
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ):
        """``retry_after``: seconds, sent as the ``Retry-After`` header (with 503s)."""
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code
        self.retry_after = retry_after

    def headers(self) -> dict[str, str] | None:
        """The response's extra headers (``Retry-After``), or None."""
        return None if self.retry_after is None else {"Retry-After": str(self.retry_after)}

    def body(self) -> dict[str, Any]:
        """The OpenAI error body."""
        return error_body(str(self), self.type, self.param, self.code)


def error_body(
    message: str,
    type: str,
    param: str | None = None,
    code: str | None = None,  # noqa: A002
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """A validated /v1/completions or /v1/chat/completions request.

    Attributes:
      chat: whether it came from /v1/chat/completions.
      prompts: token ids of each prompt (one for chat).
      n: choices per prompt.
      params: the sampling parameters of every sequence.
      stream, include_usage: server-sent events; a final usage chunk.
      echo: completions: the prompt is part of the returned text.
      logprobs: alternatives per token (0..5) when logprobs were asked for, else None.
    """

    chat: bool
    prompts: list[list[int]]
    n: int
    params: SamplingParams
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int | None


def _field_error(name: str, expected: str, value: Any) -> RequestError:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return RequestError(
        f"'{name}' must be {expected}, got {shown}", param=name, code="invalid_type"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: Mapping, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok = (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
    if not ok or not lo <= value <= hi:
        raise _field_error(name, f"a number in [{lo}, {hi}]", value)
    return float(value)


def _integer(body: Mapping, name: str, default: Any, lo: int, hi: int | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or value < lo or (hi is not None and value > hi):
        expected = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        raise _field_error(name, expected, value)
    return value


def _boolean(body: Mapping, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _field_error(name, "a boolean", value)
    return value


def check_model(body: Mapping, served_name: str) -> None:
    """404 unless ``model`` names the served model."""
    model = body.get("model")
    if not isinstance(model, str):
        raise _field_error("model", "a string (the served model's name)", model)
    if model != served_name:
        raise RequestError(
            f"The model '{model}' does not exist; this server serves '{served_name}'",
            status=404,
            param="model",
            code="model_not_found",
        )


def _unsupported(body: Mapping) -> None:
    """400 for OpenAI features this server does not implement, rather than ignoring them."""
    if body.get("best_of") not in (None, 1):
        raise RequestError("'best_of' is not supported", param="best_of")
    if body.get("suffix") is not None:
        raise RequestError("'suffix' is not supported", param="suffix")
    if body.get("logit_bias"):
        raise RequestError("'logit_bias' is not supported", param="logit_bias")
    for name in ("tools", "functions"):
        if body.get(name):
            raise RequestError(f"'{name}' is not supported: this model has no tool format")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
        raise RequestError("only response_format {'type': 'text'} is supported")


def _check_sequences(count: int, max_sequences: int | None) -> None:
    """400 when a request needs more sequences (prompts x n) than the server ever holds."""
    if max_sequences is not None and count > max_sequences:
        raise RequestError(
            f"the request needs {count} sequences (prompts x n); this server holds at most "
            f"{max_sequences} (--max-batch + --max-queue)",
            param="n",
        )


def _check_chars(text_chars: int, max_chars: int | None, what: str) -> None:
    """400 for a text too long for the context whatever it tokenises to, before tokenising it
    (``max_chars``: the context times the most characters one token covers)."""
    if max_chars is not None and text_chars > max_chars:
        raise RequestError(
            f"'{what}' has {text_chars} characters, more than the context can hold (at most "
            f"{max_chars}: the context's tokens times the characters of the longest token)",
            param=what,
            code="context_length_exceeded",
        )


def _prompt_ids(
    body: Mapping,
    tokenizer: Tokenizer,
    vocab: int,
    *,
    n: int = 1,
    max_sequences: int | None = None,
    max_chars: int | None = None,
) -> list[list[int]]:
    """``prompt``: a string, a list of strings, a list of ids, or a list of lists of ids.

    The count of prompts (times ``n``) and each string's length are checked before anything
    is tokenised (see ``parse_generation``)."""
    prompt = body.get("prompt")
    expected = "a string, a list of strings, a list of token ids or a list of lists of ids"
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise _field_error("prompt", expected, prompt)
    _check_sequences(len(items) * n, max_sequences)
    for item in items:
        if isinstance(item, str):
            _check_chars(len(item), max_chars, "prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            ids = tokenizer.encode(item, allow_special=False)
        elif isinstance(item, list) and all(_is_int(t) for t in item):
            # The library's one token check; the prompt's length against the context is
            # checked with max_tokens later, so here it only bounds itself.
            try:
                ids = check_token_ids(
                    item, vocab_size=vocab, context=max(1, len(item)), ndim=1, what="'prompt'"
                ).tolist()
            except GrokError as e:
                raise RequestError(str(e), param="prompt") from None
        else:
            raise _field_error("prompt", expected, prompt)
        if not ids:
            raise RequestError("'prompt' is empty: give at least one token", param="prompt")
        out.append(ids)
    return out


def _chat_messages(body: Mapping) -> list[dict[str, str]]:
    """``messages`` as role/content dicts of text (content parts of type text are joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _field_error("messages", "a non-empty list of messages", messages)
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise _field_error(f"messages[{i}]", "an object with a string 'role'", message)
        role, content = message["role"], message.get("content")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise RequestError(
                f"messages[{i}].role {role!r} is not supported (system, user, assistant)",
                param=f"messages[{i}].role",
            )
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, Mapping) and part.get("type") == "text"):
                    raise RequestError(
                        f"messages[{i}].content: only text parts are supported",
                        param=f"messages[{i}].content",
                    )
                parts.append(part.get("text"))
            if not all(isinstance(p, str) for p in parts):
                raise _field_error(f"messages[{i}].content", "text parts with string text", parts)
            content = "".join(parts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise _field_error(f"messages[{i}].content", "a string", content)
        out.append({"role": role, "content": content})
    return out


def _stop(body: Mapping) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    expected = f"a non-empty string or a list of up to {MAX_STOP} of them"
    if not isinstance(stops, list) or len(stops) > MAX_STOP:
        raise _field_error("stop", expected, stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise _field_error("stop", expected, stop)
    longest = max((len(s) for s in stops), default=0)
    if longest > MAX_STOP_CHARS:
        raise RequestError(
            f"'stop' strings may have at most {MAX_STOP_CHARS} characters, got one of {longest}",
            param="stop",
            code="invalid_value",
        )
    return tuple(stops)


def parse_generation(
    body: Any,
    tokenizer: Tokenizer,
    *,
    chat: bool,
    served_name: str,
    max_context: int,
    vocab: int,
    max_sequences: int | None = None,
    max_prompt_chars: int | None = None,
) -> GenerationRequest:
    """Validates a completions (``chat=False``) or chat completions body; RequestError.

    Every field is checked before the prompt is tokenised, and the prompt's size before that:
    at most ``max_sequences`` sequences (prompts x n), each prompt text (or the messages'
    text) at most ``max_prompt_chars`` characters (the context times the most characters a
    token covers: longer text cannot fit, whatever it tokenises to).
    """
    if not isinstance(body, Mapping):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    check_model(body, served_name)
    _unsupported(body)
    n = _integer(body, "n", 1, 1, MAX_N)
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, Mapping):
        raise _field_error("stream_options", "an object", options)
    include_usage = _boolean(options or {}, "include_usage")
    echo = False if chat else _boolean(body, "echo")
    logprobs = _logprobs(body, chat)
    settings = _settings(body, vocab)
    if chat:
        messages = _chat_messages(body)
        _check_sequences(n, max_sequences)
        _check_chars(sum(len(m["content"]) for m in messages), max_prompt_chars, "messages")
        try:
            prompts = [encode_chat(tokenizer, messages)]
        except GrokError as e:  # TokenizerError, GenerationError
            raise RequestError(f"'messages': {e}", param="messages") from None
        stop_ids = frozenset(chat_stop_ids(tokenizer))
    else:
        try:
            prompts = _prompt_ids(
                body,
                tokenizer,
                vocab,
                n=n,
                max_sequences=max_sequences,
                max_chars=max_prompt_chars,
            )
        except TokenizerError as e:
            raise RequestError(f"'prompt': {e}", param="prompt") from None
        stop_ids = frozenset([tokenizer.eos_id])
    max_tokens = _max_tokens(body, chat, max(len(p) for p in prompts), max_context)
    min_tokens = _integer(body, "min_tokens", 0, 0)
    if min_tokens > max_tokens:
        raise RequestError(
            f"'min_tokens' ({min_tokens}) must not exceed the completion's most tokens "
            f"({max_tokens})",
            param="min_tokens",
            code="invalid_value",
        )
    if settings.pop("ignore_eos"):  # as vLLM: no end-of-sequence token ends it (chat's too)
        stop_ids = frozenset()
    params = SamplingParams(
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        stop_ids=stop_ids,
        logprobs=logprobs,
        prompt_logprobs=echo and logprobs is not None,
        **settings,
    )
    return GenerationRequest(
        chat=chat,
        prompts=prompts,
        n=n,
        params=params,
        stream=stream,
        include_usage=include_usage,
        echo=echo,
        logprobs=logprobs,
    )


def _logprobs(body: Mapping, chat: bool) -> int | None:
    """Alternatives per token when logprobs were asked for (chat: ``logprobs`` and
    ``top_logprobs``; completions: ``logprobs``), else None."""
    if not chat:
        return _integer(body, "logprobs", None, 0, TOP_LOGPROBS)
    wants = _boolean(body, "logprobs")
    top = _integer(body, "top_logprobs", 0, 0, TOP_LOGPROBS)
    if top and not wants:
        raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return top if wants else None


def _settings(body: Mapping, vocab: int) -> dict[str, Any]:
    """The sampling fields of ``SamplingParams`` that do not depend on the prompt, with
    ``ignore_eos``. ``top_k`` is any integer >= -1; at or past the vocabulary it keeps every
    token, so it reaches the device as at most V."""
    top_k = _integer(body, "top_k", 0, -1)
    seed = _integer(body, "seed", None, 0, MAX_SEED)
    return {
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0),
        "top_k": min(max(top_k, 0), vocab),
        "min_p": _number(body, "min_p", 0.0, 0.0, 1.0),
        "presence_penalty": _number(body, "presence_penalty", 0.0, -2.0, 2.0),
        "frequency_penalty": _number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        "seed": secrets.randbits(32) if seed is None else seed,
        "stop": _stop(body),
        "ignore_eos": _boolean(body, "ignore_eos"),
    }


def _max_tokens(body: Mapping, chat: bool, longest: int, max_context: int) -> int:
    """The completion's most tokens (``max_tokens``, or chat's ``max_completion_tokens``)
    given the longest prompt of ``longest`` tokens; 400 when they do not fit the context."""
    what = "messages" if chat else "prompt"
    if chat and longest >= max_context:
        raise RequestError(
            f"This model's maximum context length is {max_context} tokens. However, your "
            f"messages resulted in {longest} tokens, leaving none for the completion.",
            param="messages",
            code="context_length_exceeded",
        )
    name = "max_tokens"
    if chat and body.get("max_completion_tokens") is not None:
        name = "max_completion_tokens"
    default = max_context - longest if chat else DEFAULT_COMPLETION_TOKENS
    max_tokens = _integer(body, name, default, 0 if not chat else 1)
    if longest + max_tokens > max_context:
        raise RequestError(
            f"This model's maximum context length is {max_context} tokens. However, you "
            f"requested {longest + max_tokens} tokens ({longest} in the {what}, {max_tokens} "
            f"for the completion). Please reduce the length of the {what} or the completion.",
            param=what if longest >= max_context else name,
            code="context_length_exceeded",
        )
    return max_tokens


# -- responses -------------------------------------------------------------------------------


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _token_text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.id_to_piece(token)


def _token_bytes(tokenizer: Tokenizer, token: int) -> list[int]:
    decode_bytes = getattr(tokenizer, "decode_bytes", None)
    if decode_bytes is not None:
        return list(decode_bytes([token]))
    return list(tokenizer.id_to_piece(token).encode("utf-8"))


def completion_logprobs(
    tokenizer: Tokenizer, infos: Sequence[TokenInfo], offset: int = 0
) -> dict[str, list[Any]]:
    """The /v1/completions ``logprobs`` object of ``infos`` (offsets shifted by ``offset``)."""
    return {
        "tokens": [_token_text(tokenizer, i.token) for i in infos],
        "token_logprobs": [i.logprob for i in infos],
        "top_logprobs": [
            {_token_text(tokenizer, t): lp for t, lp in i.top} if i.logprob is not None else None
            for i in infos
        ],
        "text_offset": [i.offset + offset for i in infos],
    }


def prompt_token_infos(tokenizer: Tokenizer, infos: Sequence[TokenInfo]) -> list[TokenInfo]:
    """``infos`` of a prompt with each token's character offset in the prompt's text."""
    out, offset = [], 0
    for info in infos:
        out.append(dataclasses.replace(info, offset=offset))
        offset += len(tokenizer.decode([info.token]))
    return out


def chat_logprobs(tokenizer: Tokenizer, infos: Sequence[TokenInfo]) -> dict[str, Any]:
    """The /v1/chat/completions ``logprobs`` object of ``infos``."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        return {
            "token": _token_text(tokenizer, token),
            "logprob": logprob,
            "bytes": _token_bytes(tokenizer, token),
        }

    return {
        "content": [
            {**entry(i.token, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top]}
            for i in infos
        ],
        "refusal": None,
    }


def envelope(request_id: str, chat: bool, model: str, chunk: bool) -> dict[str, Any]:
    """The fields every response or chunk starts with."""
    kind = "text_completion"
    if chat:
        kind = "chat.completion.chunk" if chunk else "chat.completion"
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model}


__all__ = [
    "GenerationRequest",
    "RequestError",
    "chat_logprobs",
    "check_model",
    "completion_logprobs",
    "envelope",
    "error_body",
    "new_id",
    "parse_generation",
    "prompt_token_infos",
    "usage",
]
