"""``load_tokenizer``: a tokenizer file or folder -> the :class:`Tokenizer` that reads it."""

from __future__ import annotations

import os
from pathlib import Path

from grok.errors import TokenizerError
from grok.tokenizer.base import Tokenizer
from grok.tokenizer.sentencepiece_model import SENTENCEPIECE_NAME, SentencePieceTokenizer
from grok.tokenizer.tok_json import TOK_JSON_NAME, TokJsonTokenizer


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Loads the tokenizer at ``path``.

    A file ending in ``.json`` is read as ``tokenizer.tok.json`` and one ending in ``.model`` as
    SentencePiece. A directory is searched for ``tokenizer.tok.json``, then ``tokenizer.model``.
    """
    p = Path(path)
    if p.is_dir():
        for name in (TOK_JSON_NAME, SENTENCEPIECE_NAME):
            if (p / name).is_file():
                return load_tokenizer(p / name)
        raise TokenizerError(
            f"{p}: no tokenizer in this directory (looked for {TOK_JSON_NAME} and "
            f"{SENTENCEPIECE_NAME})"
        )
    if not p.exists():
        raise TokenizerError(f"{p}: tokenizer file or directory not found")
    if p.suffix == ".json":
        return TokJsonTokenizer.from_file(p)
    if p.suffix == ".model":
        return SentencePieceTokenizer.from_file(p)
    raise TokenizerError(
        f"{p}: unknown tokenizer file type {p.suffix!r}; expected .json ({TOK_JSON_NAME}) or "
        f".model ({SENTENCEPIECE_NAME})"
    )
