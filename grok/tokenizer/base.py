"""The tokenizer interface: text <-> token ids, with the ids generation needs.

Every tokenizer (``grok.tokenizer.tok_json`` for Grok-2, ``grok.tokenizer.sentencepiece_model``
for Grok-1) implements :class:`Tokenizer`: ``encode`` text to ids, ``decode`` ids to text, and
the ids generation needs (``eos_id``, ``pad_id``, ``bos_id``, ``separator_id``). Every id handed
to ``decode`` is checked: an id outside ``[0, V)`` or one that names no token raises
:class:`~grok.errors.TokenizerError` with the id and the range.
"""

from __future__ import annotations

import abc
import operator
from collections.abc import Mapping, Sequence
from typing import Any

from grok.errors import TokenizerError


class Tokenizer(abc.ABC):
    """Text <-> token ids, with the ids generation needs.

    Attributes:
      vocab_size: V, one more than the largest id the tokenizer can produce or decode.
      eos_id: end of sequence; generation stops on it.
      pad_id: the id used to pad prompts in a batch.
      bos_id: beginning of sequence, or None when the format has none (Grok-2).
      separator_id: the chat turn separator, or None when the format has none (Grok-1).
      special_tokens: text of each special (control) token -> its id.
    """

    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None
    separator_id: int | None
    special_tokens: Mapping[str, int]
    _special_ids: frozenset[int]  # the values of special_tokens, for fast membership tests

    @abc.abstractmethod
    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of ``text``.

        Args:
          text: the text to encode.
          allow_special: when True, the text of a special token becomes that single token;
            when False it is encoded as ordinary text. Pass False for text you do not trust.
        """

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of ``ids`` ([T] ints); bytes that are not valid UTF-8 become U+FFFD.

        Raises TokenizerError for an id outside [0, V) or one that names no token.
        """

    @abc.abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """The text of one token, as the tokenizer stores it (for display and debugging)."""

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a special (control) token."""
        return self.check_id(token_id) in self._special_ids

    def check_id(self, token_id: Any) -> int:
        """``token_id`` as an int, or TokenizerError if it is not an integer in [0, V)."""
        if isinstance(token_id, bool):
            raise TokenizerError(f"token id {token_id!r} is a bool, expected an int")
        try:
            value = operator.index(token_id)
        except TypeError:
            raise TokenizerError(
                f"token id {token_id!r} is a {type(token_id).__name__}, expected an int"
            ) from None
        if not 0 <= value < self.vocab_size:
            raise TokenizerError(
                f"token id {value} is out of range: valid ids are 0 <= id < {self.vocab_size}"
            )
        return value

    def check_ids(self, ids: Sequence[int]) -> list[int]:
        """``ids`` ([T]; a list, tuple or 1-D numpy/JAX array) as a list of ints in [0, V)."""
        if hasattr(ids, "tolist") and hasattr(ids, "ndim"):
            if ids.ndim != 1:
                raise TokenizerError(f"expected a 1-D sequence of ids [T], got shape {ids.shape}")
            ids = ids.tolist()
        return [self.check_id(i) for i in ids]
