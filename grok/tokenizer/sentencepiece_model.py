"""Grok-1's tokenizer file ``tokenizer.model``: a SentencePiece model run by ``sentencepiece``.

Pad 0, bos 1, eos 2, unk 3; ``sentencepiece`` itself runs the file, so ids equal the released
tokenizer's ids exactly. The ``sentencepiece`` library is imported only when a model is
loaded (``SentencePieceTokenizer.from_file``): ``import grok`` and a Grok-2 tokenizer never
load its C++ extension.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from grok.errors import TokenizerError
from grok.tokenizer.base import Tokenizer

if TYPE_CHECKING:
    import sentencepiece

SENTENCEPIECE_NAME = "tokenizer.model"


class SentencePieceTokenizer(Tokenizer):
    """Grok-1's SentencePiece tokenizer (``tokenizer.model``): pad 0, bos 1, eos 2, unk 3.

    Ids are exactly those of ``sentencepiece.SentencePieceProcessor`` on the same file:
    SentencePiece does not parse its control tokens (``[PAD]``, ``[BOS]``, ``[EOS]``) out of
    text, so neither does this class (``allow_special`` has nothing to allow), and it decodes
    them to nothing, as SentencePiece does. The chat separator does not exist
    (``separator_id`` is None).
    """

    def __init__(self, processor: sentencepiece.SentencePieceProcessor, *, source: str):
        """Wraps a loaded processor; ``source`` is the file it came from, for messages."""
        self.source = source
        self._sp = processor
        self.vocab_size = processor.get_piece_size()
        ids = {
            "pad": processor.pad_id(),
            "bos": processor.bos_id(),
            "eos": processor.eos_id(),
            "unk": processor.unk_id(),
        }
        for name in ("pad", "bos", "eos"):
            if ids[name] < 0:
                raise TokenizerError(f"{source}: the SentencePiece model defines no {name} id")
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]
        self.unk_id = ids["unk"] if ids["unk"] >= 0 else None
        self.separator_id = None
        # Every control piece (Grok-1: [PAD], [BOS], [EOS]); a scan of V pieces takes ~40 ms.
        self.special_tokens = {
            processor.id_to_piece(i): i for i in range(self.vocab_size) if processor.is_control(i)
        }
        self._special_ids = frozenset(self.special_tokens.values())

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SentencePieceTokenizer:
        """Loads a SentencePiece ``tokenizer.model``; TokenizerError if missing or unreadable."""
        # Imported here, not at the top: only a Grok-1 tokenizer needs the C++ extension.
        import sentencepiece

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: tokenizer file not found")
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.Load(model_file=path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a readable SentencePiece model: {e}") from e
        return cls(processor, source=path)

    def encode(self, text: str, *, allow_special: bool = True, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``, optionally after BOS.

        ``add_bos`` defaults to False because the released Grok-1 runner encoded prompts with
        SentencePiece's defaults, which add no BOS; pass True for BOS-prefixed documents.
        ``allow_special`` is accepted for the common interface and changes nothing (see the
        class docstring).
        """
        del allow_special
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        ids = self._sp.encode(text, out_type=int)
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of ``ids`` [T]; control tokens decode to nothing whatever ``skip_special`` is."""
        del skip_special
        return self._sp.decode(self.check_ids(ids))

    def id_to_piece(self, token_id: int) -> str:
        """The SentencePiece piece, e.g. ``"▁Hello"`` or ``"<0xF0>"``."""
        return self._sp.id_to_piece(self.check_id(token_id))
