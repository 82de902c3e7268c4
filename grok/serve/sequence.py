"""A sequence as the engine sees it: what a request asks for (``SamplingParams``), where its
updates go (``SequenceRequest``), and what comes back (``Update``, ``TokenInfo``).

Glossary: R reported top logprobs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

from grok.serve.text import TextTracker
from grok.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """One sequence's generation settings (validated by ``grok.serve.protocol``).

    Attributes:
      max_tokens: the most new tokens (a stop token counts as one).
      min_tokens: the first min_tokens tokens never end the sequence: a stop token among
        them is kept as a token (a special one adds no text), and stop strings are looked
        for only in the text after them.
      temperature, top_k, top_p, min_p, presence_penalty, frequency_penalty: see
        ``RowSettings`` (top_k 0 and top_p 1 are off).
      seed: the request's seed; choice c of it draws from ``fold_in(key(seed), c)``.
      stop: strings that end the sequence (cut from its text).
      stop_ids: token ids that end the sequence (end of sequence, chat separator).
      logprobs: report each token's logprob with this many alternatives (0..R), or None.
      prompt_logprobs: also report the prompt tokens' logprobs (``echo`` with logprobs).
    """

    max_tokens: int
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None
    prompt_logprobs: bool = False


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    """One generated (or prompt) token as reported: its id, logprob, alternatives [R] and
    the character offset of its text in the sequence's text."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...]
    offset: int


@dataclasses.dataclass(frozen=True)
class Update:
    """What the engine hands a sequence's owner after a step.

    Attributes:
      index: the sequence's choice index in its response.
      text: new final text (possibly empty).
      tokens: the tokens behind it, when logprobs were asked for (else empty).
      finish_reason: None while running, then "stop" or "length".
      num_tokens: tokens generated so far (stop token included).
      prompt_tokens: the prompt tokens' logprobs, in the first update when asked for.
      error: set when the engine failed, or the sequence did (non-finite logits, an error
        in its text, its stop strings or its prefill); the sequence is over.
    """

    index: int
    text: str = ""
    tokens: tuple[TokenInfo, ...] = ()
    finish_reason: str | None = None
    num_tokens: int = 0
    prompt_tokens: tuple[TokenInfo, ...] | None = None
    error: str | None = None


class SequenceRequest:
    """One sequence to generate: a prompt, its settings, and where its updates go.

    ``sink(update)`` is called from the engine thread (use ``loop.call_soon_threadsafe`` to
    reach an event loop). ``cancel()`` may be called from any thread.
    """

    def __init__(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        sink: Callable[[Update], None],
        tokenizer: Tokenizer,
        *,
        index: int = 0,
    ):
        self.prompt = list(prompt)
        self.params = params
        self.sink = sink
        self.index = index
        self.text = TextTracker(tokenizer, params.stop, min_tokens=params.min_tokens)
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self.cancelled = False
        self.submitted_at = time.perf_counter()
        self.last_token_at: float | None = None
        self.generated: list[int] = []  # the tokens drawn so far (a preemption recomputes them)

    def cancel(self) -> None:
        """Asks the engine to drop the sequence (its slot is freed before the next step)."""
        self.cancelled = True


__all__ = ["SamplingParams", "SequenceRequest", "TokenInfo", "Update"]
