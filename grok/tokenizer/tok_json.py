"""Grok-2's tokenizer file ``tokenizer.tok.json``: read, validated, run by ``tiktoken``; written.

The file (``docs/spec.md`` section 5) is a byte-level BPE run by ``tiktoken``.
What this module requires of a file's ``regular_tokens`` so that tiktoken runs it correctly:

- every entry has a distinct, non-empty byte string and a distinct id; the id is the token's
  BPE rank, i.e. its merge priority (lower merges first);
- no special token shares an id with a regular token;
- every byte of the text being encoded exists as a single-byte regular token (tiktoken's BPE
  starts from single bytes and aborts the process on a byte it cannot look up). A byte-level
  BPE holds all 256 bytes; a file that lacks some still loads, and encoding text containing a
  missing byte raises :class:`TokenizerError` naming the byte instead of crashing;
- for a multi-byte token ever to be produced, it must be reachable by merging adjacent tokens
  of lower rank (the usual BPE property). This is not checked: an unreachable token costs
  nothing but its row in the embedding, and encode/decode stay lossless without it.

A file's split pattern (``pat_str``) is probed at load (``_tiktoken_encoding``) so that it can
neither crash tiktoken nor silently drop characters.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import regex
import tiktoken

from grok.errors import TokenizerError
from grok.jsonfile import read_json_file
from grok.tokenizer.base import Tokenizer

# The "V1" word split of the Grok-2 tokenizer (spec section 5): words with an optional leading
# non-letter, single digits, punctuation runs, newline runs and whitespace runs.
V1_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|eos|>"
SEPARATOR_TOKEN = "<|separator|>"

TOK_JSON_NAME = "tokenizer.tok.json"

# Token ids go into int32 arrays (and tiktoken's ranks are u32): every id must be below this.
MAX_TOKEN_ID = 2**31
# Grok-2's tokenizer.tok.json is about 6 MB; refuse to read anything near this before parsing.
MAX_TOK_JSON_BYTES = 2**28
# The V1 pattern is ~120 characters; a longer pat_str only costs compile time.
MAX_PAT_STR_CHARS = 10_000
# Text a split pattern must cover exactly at load (every kind of character the V1 pattern
# distinguishes): a pattern that skips characters would silently drop them from prompts.
PAT_STR_PROBE = (
    'Hello, World! It\'s 2024-12-01; x = y+1 /* ok */ "tab"\there\n\n'
    "caf\u00e9 na\u00efve \u6771\u4eac\u90fd \u0645\u0631\u062d\u0628\u0627 "
    "\U0001f642\u200b  \r\n end\u3000.  "
)
_PROBE_TIMEOUT_S = 2.0


class TokJsonTokenizer(Tokenizer):
    """Grok-2's byte-level BPE tokenizer (``tokenizer.tok.json``), run by tiktoken.

    There is no BOS token. ``eos_id`` is ``<|eos|>`` (2 in the release), ``pad_id`` is
    ``<|pad|>`` and ``separator_id`` is ``<|separator|>`` (None if the file has none).
    Build one with :meth:`from_file`, or directly from the parsed tables.
    """

    def __init__(
        self,
        regular_tokens: Mapping[bytes, int],
        special_tokens: Mapping[str, int],
        *,
        pat_str: str = V1_PAT_STR,
        vocab_size: int | None = None,
        default_allowed_special: frozenset[str] = frozenset(),
        source: str = "<memory>",
    ):
        """Builds the tokenizer from validated tables.

        Args:
          regular_tokens: BPE token bytes -> id (= merge rank).
          special_tokens: special token text -> id.
          pat_str: the regex that splits text into words before BPE.
          vocab_size: V; raised to the largest id + 1 when smaller.
          default_allowed_special: what the file's ``default_allowed_special`` lists (kept for
            reference; ``encode(allow_special=True)`` allows every special token).
          source: the file the tables came from, named in error messages.
        """
        _check_tables(regular_tokens, special_tokens, source)
        for name in (EOS_TOKEN, PAD_TOKEN):
            if name not in special_tokens:
                raise TokenizerError(f"{source}: special token {name} is missing")
        self.source = source
        self.pat_str = pat_str
        self.default_allowed_special = default_allowed_special
        self.special_tokens = dict(special_tokens)
        self._special_ids = frozenset(special_tokens.values())
        self.eos_id = special_tokens[EOS_TOKEN]
        self.pad_id = special_tokens[PAD_TOKEN]
        self.bos_id = None
        self.separator_id = special_tokens.get(SEPARATOR_TOKEN)
        max_id = max([*regular_tokens.values(), *special_tokens.values()])
        self.vocab_size = max(vocab_size or 0, max_id + 1)
        self._id_to_bytes = {i: b for b, i in regular_tokens.items()}
        self._id_to_bytes.update({i: t.encode("utf-8") for t, i in special_tokens.items()})
        single_bytes = {b[0] for b in regular_tokens if len(b) == 1}
        self._missing_bytes = frozenset(range(256)) - single_bytes
        self._encoding = _tiktoken_encoding(
            pat_str, dict(regular_tokens), dict(special_tokens), source
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TokJsonTokenizer:
        """Loads and validates a ``tokenizer.tok.json`` file (spec section 5).

        Raises TokenizerError naming the file and the entry for a missing file, invalid JSON,
        a missing key, a value of the wrong type, duplicate bytes or ids, or an id shared by a
        regular and a special token.
        """
        path = os.fspath(path)
        data = read_json_file(
            path, error=TokenizerError, what="tokenizer file", max_bytes=MAX_TOK_JSON_BYTES
        )
        return cls(**_parse_tok_json(data, path), source=path)

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of ``text`` (no BOS is added: Grok-2 has none)."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        if self._missing_bytes:
            self._check_bytes_present(text)
        try:
            if allow_special:
                ids = self._encoding.encode(text, allowed_special="all")
            else:
                ids = self._encoding.encode_ordinary(text)
        except BaseException as err:  # tiktoken's Rust panics derive from BaseException
            if not _is_rust_panic(err):
                raise
            raise TokenizerError(
                f"{self.source}: tiktoken failed on the text with this pat_str ({err})"
            ) from None
        encoded = sum(len(self._id_to_bytes[i]) for i in ids)
        expected = len(_text_bytes(text))
        if encoded != expected:
            raise TokenizerError(
                f"{self.source}: pat_str does not cover the text: its {expected} UTF-8 bytes "
                f"became tokens of {encoded} bytes (the split pattern skips some characters)"
            )
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of ``ids`` [T]; special tokens appear as their text unless ``skip_special``."""
        return self.decode_bytes(ids, skip_special=skip_special).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int], *, skip_special: bool = False) -> bytes:
        """The raw bytes of ``ids`` [T] (a token may end inside a UTF-8 character)."""
        ids = [self._check_assigned(i) for i in self.check_ids(ids)]
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        return b"".join(self._id_to_bytes[i] for i in ids)

    def id_to_piece(self, token_id: int) -> str:
        """The token's text; bytes that are not valid UTF-8 on their own show as ``\\xNN``."""
        token_id = self._check_assigned(self.check_id(token_id))
        return self._id_to_bytes[token_id].decode("utf-8", errors="backslashreplace")

    def _check_assigned(self, token_id: int) -> int:
        if token_id not in self._id_to_bytes:
            raise TokenizerError(
                f"token id {token_id} names no token of {self.source} (it is inside the valid "
                f"range 0 <= id < {self.vocab_size} but neither a regular nor a special token)"
            )
        return token_id

    def _check_bytes_present(self, text: str) -> None:
        data = _text_bytes(text)
        missing = sorted(self._missing_bytes.intersection(data))
        if missing:
            raise TokenizerError(
                f"{self.source}: cannot encode the text: byte 0x{missing[0]:02x} is not a "
                "single-byte regular token, and byte-level BPE needs every byte it meets"
            )


def _text_bytes(text: str) -> bytes:
    """The UTF-8 bytes tiktoken encodes ``text`` as (lone surrogates become U+FFFD)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode()


def _is_rust_panic(err: BaseException) -> bool:
    """Whether ``err`` is PyO3's ``pyo3_runtime.PanicException`` (a Rust panic in tiktoken).

    PyO3 creates that class at run time without a module to import it from, so it is
    recognised by its qualified name.
    """
    cls = type(err)
    return cls.__module__ == "pyo3_runtime" and cls.__name__ == "PanicException"


def _tiktoken_encoding(
    pat_str: str, ranks: dict[bytes, int], special: dict[str, int], source: str
) -> tiktoken.Encoding:
    """tiktoken's encoder for the tables, after checking that ``pat_str`` splits text safely.

    tiktoken's regex engine compiles the pattern first (it refuses oversized patterns quickly,
    which the ``regex`` module would spend minutes compiling); then the ``regex`` module, whose
    syntax tiktoken's engine shares, checks on ``PAT_STR_PROBE`` that the pattern never matches
    the empty string (tiktoken panics on an empty piece) and covers every character (else
    tiktoken silently drops the rest); finally tiktoken itself must round-trip the probe.
    """
    where = f"{source}: pat_str"
    if len(pat_str) > MAX_PAT_STR_CHARS:
        raise TokenizerError(
            f"{where} has {len(pat_str)} characters, more than {MAX_PAT_STR_CHARS}"
        )
    name = os.path.basename(source)
    try:
        encoding = tiktoken.Encoding(
            name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special
        )
    except ValueError as e:  # the Rust regex engine rejects pat_str
        raise TokenizerError(f"{where} is not a valid split pattern: {e}") from None
    except BaseException as e:
        if not _is_rust_panic(e):
            raise
        raise TokenizerError(f"{where} made tiktoken fail ({e})") from None
    try:
        pieces = list(regex.finditer(pat_str, PAT_STR_PROBE, timeout=_PROBE_TIMEOUT_S))
    except (regex.error, TimeoutError) as e:
        raise TokenizerError(f"{where} cannot be checked: {e}") from None
    offset = 0
    for piece in pieces:
        if piece.start() != offset:
            raise TokenizerError(
                f"{where} does not cover the text: it skips "
                f"{PAT_STR_PROBE[offset : piece.start()]!r} of the probe {PAT_STR_PROBE!r}"
            )
        if piece.end() == piece.start():
            raise TokenizerError(
                f"{where} matches the empty string at offset {offset} of the probe "
                f"{PAT_STR_PROBE!r}; tiktoken needs every piece non-empty"
            )
        offset = piece.end()
    if offset != len(PAT_STR_PROBE):
        raise TokenizerError(
            f"{where} does not cover the text: it skips {PAT_STR_PROBE[offset:]!r} at the end "
            f"of the probe {PAT_STR_PROBE!r}"
        )
    missing = set(_text_bytes(PAT_STR_PROBE)) - {b[0] for b in ranks if len(b) == 1}
    if not missing:  # a vocabulary without every byte cannot encode the probe at all
        try:
            ids = encoding.encode_ordinary(PAT_STR_PROBE)
        except BaseException as e:
            if not _is_rust_panic(e):
                raise
            raise TokenizerError(f"{where} made tiktoken fail on the probe ({e})") from None
        if encoding.decode_bytes(ids) != _text_bytes(PAT_STR_PROBE):
            raise TokenizerError(f"{where} does not round-trip the probe {PAT_STR_PROBE!r}")
    return encoding


def _parse_tok_json(data: Any, path: str) -> dict[str, Any]:
    """The constructor arguments of TokJsonTokenizer from a parsed tok.json, validated."""
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    for key in ("regular_tokens", "special_tokens"):
        if key not in data:
            raise TokenizerError(f"{path}: required key {key!r} is missing")
        if not isinstance(data[key], list):
            raise TokenizerError(f"{path}: {key!r} must be a list, got {type(data[key]).__name__}")
    regular: dict[bytes, int] = {}
    for n, entry in enumerate(data["regular_tokens"]):
        token_bytes, token_id = _parse_entry(entry, f"{path}: regular_tokens[{n}]")
        if token_bytes in regular:
            raise TokenizerError(
                f"{path}: regular_tokens[{n}] repeats the bytes {token_bytes!r} "
                f"of id {regular[token_bytes]}"
            )
        regular[token_bytes] = token_id
    if not regular:
        raise TokenizerError(f"{path}: 'regular_tokens' is empty")
    special: dict[str, int] = {}
    for n, entry in enumerate(data["special_tokens"]):
        token_bytes, token_id = _parse_entry(entry, f"{path}: special_tokens[{n}]")
        text = _utf8(token_bytes, f"{path}: special_tokens[{n}]")
        if text in special:
            raise TokenizerError(
                f"{path}: special_tokens[{n}] repeats {text!r} of id {special[text]}"
            )
        special[text] = token_id

    pat_str = data.get("pat_str")
    if pat_str is None:
        word_split = data.get("word_split", "V1")
        if word_split != "V1":
            raise TokenizerError(
                f"{path}: word_split {word_split!r} is unknown (only 'V1' is defined) and "
                "no pat_str is given"
            )
        pat_str = V1_PAT_STR
    elif not isinstance(pat_str, str) or not pat_str:
        raise TokenizerError(f"{path}: 'pat_str' must be a non-empty string, got {pat_str!r}")

    vocab_size = data.get("vocab_size")
    if vocab_size is not None and (
        isinstance(vocab_size, bool)
        or not isinstance(vocab_size, int)
        or not 1 <= vocab_size <= MAX_TOKEN_ID
    ):
        raise TokenizerError(
            f"{path}: 'vocab_size' must be an int in [1, {MAX_TOKEN_ID}], got {vocab_size!r}"
        )

    allowed: set[str] = set()
    raw_allowed = data.get("default_allowed_special", [])
    if not isinstance(raw_allowed, list):
        raise TokenizerError(
            f"{path}: 'default_allowed_special' must be a list, got {type(raw_allowed).__name__}"
        )
    for n, item in enumerate(raw_allowed):
        where = f"{path}: default_allowed_special[{n}]"
        allowed.add(_utf8(_parse_bytes(item, where), where))
    return {
        "regular_tokens": regular,
        "special_tokens": special,
        "pat_str": pat_str,
        "vocab_size": vocab_size,
        "default_allowed_special": frozenset(allowed),
    }


def _parse_entry(entry: Any, where: str) -> tuple[bytes, int]:
    """(bytes, id) of one ``{"bytes": [ints], "token": id}`` entry."""
    if not isinstance(entry, dict):
        raise TokenizerError(f"{where}: expected an object, got {type(entry).__name__}")
    for key in ("bytes", "token"):
        if key not in entry:
            raise TokenizerError(f"{where}: key {key!r} is missing")
    token_id = entry["token"]
    if not _is_token_id(token_id):
        raise TokenizerError(
            f"{where}: 'token' must be an int in [0, {MAX_TOKEN_ID}), got {token_id!r}"
        )
    return _parse_bytes(entry["bytes"], f"{where}.bytes"), token_id


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_TOKEN_ID


def _parse_bytes(value: Any, where: str) -> bytes:
    if not isinstance(value, list) or not value:
        raise TokenizerError(f"{where}: expected a non-empty list of byte values, got {value!r}")
    for b in value:
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= 255:
            raise TokenizerError(f"{where}: {b!r} is not a byte value (an int in 0..255)")
    return bytes(value)


def _utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise TokenizerError(f"{where}: special token bytes {data!r} are not UTF-8") from None


def _check_tables(regular: Mapping[bytes, int], special: Mapping[str, int], source: str) -> None:
    """Types, distinct ids, and no id shared by a regular and a special token."""
    if not regular:
        raise TokenizerError(f"{source}: there are no regular tokens")
    id_to_regular: dict[int, bytes] = {}
    for token_bytes, token_id in regular.items():
        if not isinstance(token_bytes, bytes) or not token_bytes:
            raise TokenizerError(f"{source}: regular token {token_bytes!r} is not non-empty bytes")
        if not _is_token_id(token_id):
            raise TokenizerError(
                f"{source}: regular token {token_bytes!r} has id {token_id!r}, "
                f"expected an int in [0, {MAX_TOKEN_ID})"
            )
        if token_id in id_to_regular:
            raise TokenizerError(
                f"{source}: id {token_id} is used by two regular tokens, "
                f"{id_to_regular[token_id]!r} and {token_bytes!r}"
            )
        id_to_regular[token_id] = token_bytes
    id_to_special: dict[int, str] = {}
    for text, token_id in special.items():
        if not isinstance(text, str) or not text:
            raise TokenizerError(f"{source}: special token {text!r} is not a non-empty str")
        if not _is_token_id(token_id):
            raise TokenizerError(
                f"{source}: special token {text!r} has id {token_id!r}, "
                f"expected an int in [0, {MAX_TOKEN_ID})"
            )
        if token_id in id_to_special:
            raise TokenizerError(
                f"{source}: id {token_id} is used by two special tokens, "
                f"{id_to_special[token_id]!r} and {text!r}"
            )
        if token_id in id_to_regular:
            raise TokenizerError(
                f"{source}: id {token_id} is used by special token {text!r} and by regular "
                f"token {id_to_regular[token_id]!r}"
            )
        id_to_special[token_id] = text


def write_tok_json(
    path: str | os.PathLike[str],
    regular_tokens: Mapping[bytes, int],
    special_tokens: Mapping[str, int],
    *,
    pat_str: str | None = None,
    vocab_size: int | None = None,
) -> None:
    """Writes a tokenizer in the released ``tokenizer.tok.json`` format (spec section 5).

    Entries are written in id order with ``word_split: "V1"``. ``pat_str`` is written only when
    given (readers then use it instead of the V1 pattern). ``vocab_size`` is written only when
    given; note that vLLM's reader checks it equals the number of tokens and the largest id + 1,
    so give it for a vocabulary without gaps. The tables are validated as the reader validates
    them, and the written file is loaded back before returning.

    Args:
      path: the file to write.
      regular_tokens: BPE token bytes -> id (= merge rank).
      special_tokens: special token text -> id; must include ``<|eos|>`` and ``<|pad|>``.
      pat_str: the split pattern, or None for the V1 pattern.
      vocab_size: V to record, at least the largest id + 1.
    """
    path = os.fspath(path)
    _check_tables(regular_tokens, special_tokens, path)
    for name in (EOS_TOKEN, PAD_TOKEN):
        if name not in special_tokens:
            raise TokenizerError(f"{path}: special token {name} is missing")
    max_id = max([*regular_tokens.values(), *special_tokens.values()])
    if vocab_size is not None and (
        isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= max_id
    ):
        raise TokenizerError(
            f"{path}: vocab_size must be an int > the largest id {max_id}, got {vocab_size!r}"
        )
    data: dict[str, Any] = {
        "regular_tokens": [
            {"bytes": list(b), "token": i} for b, i in sorted(regular_tokens.items(), key=_by_id)
        ],
        "special_tokens": [
            {"bytes": list(t.encode("utf-8")), "token": i}
            for t, i in sorted(special_tokens.items(), key=_by_id)
        ],
        "word_split": "V1",
    }
    if pat_str is not None:
        data["pat_str"] = pat_str
    if vocab_size is not None:
        data["vocab_size"] = vocab_size
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
    TokJsonTokenizer.from_file(path)


def _by_id(item: tuple[Any, int]) -> int:
    return item[1]
