"""Tokenizers of Grok-2 (``tokenizer.tok.json``) and Grok-1 (``tokenizer.model``); chat format.

- ``base``: the interface, :class:`Tokenizer` (``encode``, ``decode``, the ids generation
  needs; every id checked).
- ``tok_json``: Grok-2's ``tokenizer.tok.json`` (spec section 5), validated and run by
  ``tiktoken`` (:class:`TokJsonTokenizer`), and its writer (:func:`write_tok_json`).
- ``sentencepiece_model``: Grok-1's ``tokenizer.model`` (:class:`SentencePieceTokenizer`),
  run by ``sentencepiece``, which is imported only when such a model is loaded.
- ``load``: :func:`load_tokenizer`, a file or folder to the tokenizer that reads it.
- ``chat``: the Grok-2 chat format (:func:`format_chat`, :func:`encode_chat`,
  :func:`chat_stop_ids`).
"""

from grok.tokenizer.base import Tokenizer
from grok.tokenizer.chat import GENERATION_PROMPT, chat_stop_ids, encode_chat, format_chat
from grok.tokenizer.load import load_tokenizer
from grok.tokenizer.sentencepiece_model import SENTENCEPIECE_NAME, SentencePieceTokenizer
from grok.tokenizer.tok_json import (
    EOS_TOKEN,
    MAX_PAT_STR_CHARS,
    MAX_TOK_JSON_BYTES,
    MAX_TOKEN_ID,
    PAD_TOKEN,
    PAT_STR_PROBE,
    SEPARATOR_TOKEN,
    TOK_JSON_NAME,
    V1_PAT_STR,
    TokJsonTokenizer,
    write_tok_json,
)

__all__ = [
    "EOS_TOKEN",
    "GENERATION_PROMPT",
    "MAX_PAT_STR_CHARS",
    "MAX_TOKEN_ID",
    "MAX_TOK_JSON_BYTES",
    "PAD_TOKEN",
    "PAT_STR_PROBE",
    "SENTENCEPIECE_NAME",
    "SEPARATOR_TOKEN",
    "TOK_JSON_NAME",
    "V1_PAT_STR",
    "SentencePieceTokenizer",
    "TokJsonTokenizer",
    "Tokenizer",
    "chat_stop_ids",
    "encode_chat",
    "format_chat",
    "load_tokenizer",
    "write_tok_json",
]
