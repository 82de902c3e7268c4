"""A sequence's text as its tokens arrive: incremental decoding and stop strings.

A stop string may be split over several tokens, and a token may end inside a UTF-8 character,
so text is only handed out once it can no longer change: a trailing partial character waits
for its next bytes, and a tail that could still grow into a stop string waits for the next
token. When a stop string appears the text is cut just before it and the sequence ends.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from grok.tokenizer import Tokenizer


class TextTracker:
    """Text of one generated sequence, with stop strings.

    Attributes:
      text: the text decoded so far (cut before a stop string once one is found).
      stopped: whether a stop string was found (no more tokens should be pushed).
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        """``stop``: non-empty strings that end the sequence (not included in its text)."""
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.stopped = False
        self._emitted = 0  # characters of ``text`` already handed out
        self._ids: list[int] = []
        # Byte-level tokenizers decode token by token (linear); others re-decode the whole
        # sequence per token, since SentencePiece's leading spaces depend on the neighbours.
        self._bytes = getattr(tokenizer, "decode_bytes", None)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> int:
        """Adds one token; returns the character offset in ``text`` where its text starts."""
        offset = len(self.text)
        if self.stopped:
            return offset
        self._ids.append(token_id)
        if self._bytes is not None:
            piece = self._utf8.decode(self._bytes([token_id], skip_special=True))
        else:
            full = self.tokenizer.decode(self._ids, skip_special=True)
            if full.endswith("\ufffd") or not full.startswith(self.text):
                return offset  # wait for the character (or the word) to complete
            piece = full[len(self.text) :]
        self._append(piece)
        return offset

    def finish(self) -> None:
        """Flushes a trailing partial character (as U+FFFD), at the end of the sequence."""
        if self.stopped:
            return
        if self._bytes is not None:
            self._append(self._utf8.decode(b"", final=True))
        else:
            full = self.tokenizer.decode(self._ids, skip_special=True)
            if full.startswith(self.text):
                self._append(full[len(self.text) :])
        self._max_stop = 0  # nothing more can arrive: release the held-back tail

    def take(self) -> str:
        """The text that is final and not yet handed out (possibly empty)."""
        end = len(self.text) if self.stopped else len(self.text) - self._held_back()
        out = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return out

    def _append(self, piece: str) -> None:
        if not piece:
            return
        start = max(0, len(self.text) - self._max_stop + 1)  # a stop string may straddle
        self.text += piece
        found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if found:
            self.text = self.text[: min(found)]
            self.stopped = True

    def _held_back(self) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        for n in range(min(self._max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0


__all__ = ["TextTracker"]
