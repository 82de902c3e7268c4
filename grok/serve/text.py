"""A sequence's text as its tokens arrive: incremental decoding and stop strings; and the
tokenizer as the server uses it (``ServedTokenizer``: every id the model can draw decodes).

A stop string may be split over several tokens, and a token may end inside a UTF-8 character,
so text is only handed out once it can no longer change: a trailing partial character waits
for its next bytes, and a tail that could still grow into a stop string waits for the next
token. When a stop string appears the text is cut just before it and the sequence ends.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from grok.errors import TokenizerError
from grok.tokenizer import Tokenizer

# What an id the tokenizer cannot decode becomes (U+FFFD REPLACEMENT CHARACTER, as invalid
# UTF-8 already does).
REPLACEMENT = "\ufffd"


class ServedTokenizer(Tokenizer):
    """A tokenizer for a model of ``vocab`` ids: every id the model can draw decodes.

    A tokenizer smaller than the model's vocabulary is common (vocabularies are padded, e.g.
    to a multiple of 128 for sharding) and is served, not refused: the padding rows are
    trained never to be drawn, refusing would make such checkpoints unservable, and a model
    that does draw one (a random or damaged one) then shows U+FFFD in its text instead of
    failing the request. So ids in [0, ``vocab``) that the tokenizer cannot decode (past its
    size, or a gap in its table) decode as U+FFFD (``decode``, ``decode_bytes``,
    ``id_to_piece``); the others decode as the tokenizer decodes them. ``encode`` refuses
    text whose ids fall outside the model's vocabulary (a tokenizer larger than the model).

    Attributes:
      inner: the wrapped tokenizer.
      vocab_size: V, the model's vocabulary.
      unknown: how many ids in [0, V) the tokenizer cannot decode.
      max_token_chars: an upper bound on the characters of text one token covers (the
        longest piece): a text of more than ``n * max_token_chars`` characters cannot fit
        in ``n`` tokens, which bounds a prompt before it is tokenised. (SentencePiece's
        normaliser can fold runs of spaces, so there only as a bound on sensible text.)
    """

    def __init__(self, tokenizer: Tokenizer, vocab: int):
        self.inner = tokenizer
        self.vocab_size = vocab
        self.eos_id, self.pad_id = tokenizer.eos_id, tokenizer.pad_id
        self.bos_id, self.separator_id = tokenizer.bos_id, tokenizer.separator_id
        self.special_tokens = dict(tokenizer.special_tokens)
        self._special_ids = frozenset(self.special_tokens.values())
        # One pass over the table at start-up (~0.1 s for 131072 ids) finds the gaps and the
        # longest piece, so a request never pays for it.
        self._decodable = min(tokenizer.vocab_size, vocab)  # ids below this may decode
        holes, longest = set(), 1
        for i in range(self._decodable):
            try:
                longest = max(longest, len(tokenizer.id_to_piece(i)))
            except TokenizerError:
                holes.add(i)
        self._holes = frozenset(holes)
        self.unknown = vocab - self._decodable + len(holes)
        self.max_token_chars = longest
        # Same ids, none missing: decode straight through (the SentencePiece path re-decodes
        # the whole sequence per token, where a second pass over the ids would show).
        self._plain = self.unknown == 0 and tokenizer.vocab_size == vocab
        if hasattr(tokenizer, "decode_bytes"):  # byte-level: TextTracker decodes per token
            self.decode_bytes = self._decode_bytes

    @classmethod
    def wrap(cls, tokenizer: Tokenizer, vocab: int) -> ServedTokenizer:
        """``tokenizer`` for a model of ``vocab`` ids (itself when it is one already)."""
        if isinstance(tokenizer, cls) and tokenizer.vocab_size == vocab:
            return tokenizer
        return cls(tokenizer, vocab)

    def mismatch(self) -> str | None:
        """One line on how the tokenizer and the model's vocabulary differ, or None."""
        inner, vocab = self.inner.vocab_size, self.vocab_size
        notes = []
        if self.unknown:
            unknown = [f"ids {inner}..{vocab - 1}"] if inner < vocab else []
            if self._holes:
                unknown.append(f"{len(self._holes)} unassigned ids below {self._decodable}")
            notes.append(" and ".join(unknown) + " decode as U+FFFD")
        if inner > vocab:
            notes.append(f"prompts that encode to ids >= {vocab} are refused")
        if not notes:
            return None
        sizes = f"the tokenizer has {inner} ids and the model's vocabulary {vocab}"
        return f"{sizes}: " + "; ".join(notes)

    def known(self, token_id: int) -> bool:
        """Whether the tokenizer can decode ``token_id`` (an id in [0, V))."""
        return token_id < self._decodable and token_id not in self._holes

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        ids = self.inner.encode(text, allow_special=allow_special)
        top = max(ids, default=0)
        if top >= self.vocab_size:
            raise TokenizerError(
                f"the text encodes to token id {top}, outside the model's vocabulary "
                f"[0, {self.vocab_size}) (the tokenizer has {self.inner.vocab_size} ids)"
            )
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        if self._plain:
            return self.inner.decode(ids, skip_special=skip_special)
        ids = self.check_ids(ids)
        out: list[str] = []
        run: list[int] = []  # known ids decode together (SentencePiece joins words by context)
        for i in ids:
            if self.known(i):
                run.append(i)
                continue
            if run:
                out.append(self.inner.decode(run, skip_special=skip_special))
                run = []
            out.append(REPLACEMENT)
        if run:
            out.append(self.inner.decode(run, skip_special=skip_special))
        return "".join(out)

    def _decode_bytes(self, ids: Sequence[int], *, skip_special: bool = False) -> bytes:
        """The bytes of ``ids`` [T] (U+FFFD's for an id the tokenizer cannot decode)."""
        inner = self.inner.decode_bytes  # type: ignore[attr-defined]
        if self._plain:
            return inner(ids, skip_special=skip_special)
        replacement = REPLACEMENT.encode()
        return b"".join(
            inner([i], skip_special=skip_special) if self.known(i) else replacement
            for i in self.check_ids(ids)
        )

    def id_to_piece(self, token_id: int) -> str:
        token_id = self.check_id(token_id)
        return self.inner.id_to_piece(token_id) if self.known(token_id) else REPLACEMENT


class TextTracker:
    """Text of one generated sequence, with stop strings.

    Attributes:
      text: the text decoded so far (cut before a stop string once one is found).
      stopped: whether a stop string was found (no more tokens should be pushed).
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), *, min_tokens: int = 0):
        """``stop``: non-empty strings that end the sequence (not included in its text); they
        are looked for only in the text after the first ``min_tokens`` tokens."""
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self._min_tokens = min_tokens
        # Where in ``text`` a stop string may begin; None until min_tokens tokens exist.
        self._stop_from: int | None = 0 if min_tokens == 0 else None
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
            self._append(self._utf8.decode(self._bytes([token_id], skip_special=True)))
        else:
            full = self.tokenizer.decode(self._ids, skip_special=True)
            # Otherwise wait for the character (or the word) to complete.
            if not full.endswith(REPLACEMENT) and full.startswith(self.text):
                self._append(full[len(self.text) :])
        if self._stop_from is None and len(self._ids) >= self._min_tokens:
            self._stop_from = len(self.text)
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
        if self._stop_from is None:  # fewer than min_tokens tokens: no stop string yet
            self.text += piece
            return
        # A stop string may straddle the old text's end, but never begins before _stop_from.
        start = max(self._stop_from, len(self.text) - self._max_stop + 1)
        self.text += piece
        found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if found:
            self.text = self.text[: min(found)]
            self.stopped = True

    def _held_back(self) -> int:
        """Length of the longest tail of ``text`` (after ``_stop_from``) that begins some stop
        string. Only the places where a stop string's first character occurs are tried, so a
        token costs about one scan of the tail per stop string, not one per tail length."""
        if self._stop_from is None:
            return 0
        window = min(self._max_stop - 1, len(self.text) - self._stop_from)
        if window <= 0:
            return 0
        tail = self.text[-window:]
        best = 0
        for s in self.stop:
            at = tail.find(s[0])
            while at != -1 and window - at > best:
                if s.startswith(tail[at:]):
                    best = window - at
                    break
                at = tail.find(s[0], at + 1)
        return best


__all__ = ["REPLACEMENT", "ServedTokenizer", "TextTracker"]
