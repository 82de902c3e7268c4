"""Tests of grok.tokenizer: the tok.json BPE tokenizer, SentencePiece, loading, chat format.

The tok.json tests train a small but real byte-level BPE here (all 256 bytes plus merges
learned from a corpus), write it in the released format, and compare tiktoken's ids against
a plain-Python BPE encoder written below as an independent reference.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import regex
import sentencepiece

from grok.errors import GenerationError, TokenizerError
from grok.tokenizer import (
    V1_PAT_STR,
    SentencePieceTokenizer,
    TokJsonTokenizer,
    chat_stop_ids,
    encode_chat,
    format_chat,
    load_tokenizer,
    write_tok_json,
)

GROK1_MODEL = Path(__file__).resolve().parents[3] / "shared/data/grok1/tokenizer.model"

# Special ids laid out like the release (pad 0, separator 1, eos 2, then reserved/control);
# ids 5..7 are left unassigned on purpose, regular tokens start at 8.
SPECIALS = {
    "<|pad|>": 0,
    "<|separator|>": 1,
    "<|eos|>": 2,
    "<|reserved_3|>": 3,
    "<|control1|>": 4,
}
FIRST_REGULAR_ID = 8
JSON_VOCAB_SIZE = 512  # larger than any id, as a padded embedding would be

CORPUS = (
    "the quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs.\n"
    "there is the thing that they think is theirs, and then there were three.\n"
    "  indented line with    spaces\n\n\ttabbed line\n"
    "numbers 12345 and 2024-06-01, prices $3.50 and 42%.\n"
    "café naïve résumé façade. 日本語のテキスト 日本語 中文 😀😀 👍\n"
) * 3

ROUND_TRIP_TEXTS = [
    "",
    "the quick brown fox",
    "The  dog\tsleeps.\n\n\nThen   it   woke",
    "   leading and trailing   ",
    "\n",
    "\r\n windows line\r\nend",
    "日本語のテキスト、中文和한국어",
    "emoji: 😀👍🏽 👨‍👩‍👧 family",
    "accents: café naïve résumé Ångström ñ ü",
    "digits 0123456789 and 3.14159 and 1,000,000",
    "mixed\u00a0nbsp\u2003em-space and zero\u200bwidth",
    "punctuation!!! ??? ... --- ''' \"\"\" ``` {}[]()<>",
    "it's they're we've I'm you'll he'd",
]


def _train_bpe(corpus: str, num_merges: int, first_id: int) -> dict[bytes, int]:
    """Byte-level BPE: every single byte, then the most frequent adjacent pair, repeatedly."""
    ranks = {bytes([b]): first_id + b for b in range(256)}
    words = collections.Counter(regex.findall(V1_PAT_STR, corpus))
    seqs = {w: [bytes([b]) for b in w.encode("utf-8")] for w in words}
    for _ in range(num_merges):
        pairs: collections.Counter[tuple[bytes, bytes]] = collections.Counter()
        for w, count in words.items():
            seq = seqs[w]
            for a, b in zip(seq, seq[1:], strict=False):
                pairs[(a, b)] += count
        if not pairs:
            break
        # Most frequent pair; ties to the pair of lowest ranks, so training is deterministic.
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], -ranks[kv[0][0]], -ranks[kv[0][1]]))
        ranks.setdefault(a + b, first_id + len(ranks))
        for w, seq in seqs.items():
            merged, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(seq[i])
                    i += 1
            seqs[w] = merged
    return ranks


def _reference_encode(text: str, ranks: dict[bytes, int], specials: dict[str, int]) -> list[int]:
    """Plain-Python byte-level BPE with special tokens, as tiktoken defines it: split out the
    special tokens, split the rest with the V1 pattern, then in each piece merge the adjacent
    pair whose concatenation has the lowest rank (leftmost on ties) until none is a token."""
    ids: list[int] = []
    special_re = "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))
    for n, segment in enumerate(regex.split(f"({special_re})", text)):
        if n % 2 == 1:
            ids.append(specials[segment])
            continue
        for word in regex.findall(V1_PAT_STR, segment):
            data = word.encode("utf-8")
            if data in ranks:
                ids.append(ranks[data])
                continue
            parts = [bytes([b]) for b in data]
            while len(parts) > 1:
                merges = [
                    (ranks[parts[i] + parts[i + 1]], i)
                    for i in range(len(parts) - 1)
                    if parts[i] + parts[i + 1] in ranks
                ]
                if not merges:
                    break
                _, i = min(merges)
                parts[i : i + 2] = [parts[i] + parts[i + 1]]
            ids += [ranks[p] for p in parts]
    return ids


@pytest.fixture(scope="module")
def ranks() -> dict[bytes, int]:
    return _train_bpe(CORPUS, num_merges=120, first_id=FIRST_REGULAR_ID)


@pytest.fixture(scope="module")
def tok_path(ranks, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.tok.json"
    write_tok_json(path, ranks, SPECIALS, vocab_size=JSON_VOCAB_SIZE)
    return path


@pytest.fixture(scope="module")
def tok(tok_path) -> TokJsonTokenizer:
    return TokJsonTokenizer.from_file(tok_path)


# --- the trained BPE is real -------------------------------------------------------------


def test_trained_bpe_has_all_bytes_and_merges(ranks):
    assert all(bytes([b]) in ranks for b in range(256))
    merged = [b for b in ranks if len(b) > 1]
    assert len(merged) >= 100
    assert b"the" in ranks or b" the" in ranks


# --- tok.json: ids, round trips, specials ------------------------------------------------


def test_ids_and_vocab_size(tok, ranks):
    assert tok.eos_id == 2
    assert tok.pad_id == 0
    assert tok.separator_id == 1
    assert tok.bos_id is None
    assert tok.special_tokens == SPECIALS
    assert tok.vocab_size == JSON_VOCAB_SIZE
    assert tok.is_special(2) and tok.is_special(4)
    assert not tok.is_special(FIRST_REGULAR_ID)


def test_vocab_size_is_at_least_max_id_plus_one(tmp_path, ranks):
    path = tmp_path / "small.tok.json"
    write_tok_json(path, ranks, SPECIALS)
    data = json.loads(path.read_text())
    data["vocab_size"] = 10  # smaller than the ids in the file
    path.write_text(json.dumps(data))
    assert TokJsonTokenizer.from_file(path).vocab_size == max(ranks.values()) + 1


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_ids_match_reference_bpe(tok, ranks, text):
    assert tok.encode(text) == _reference_encode(text, ranks, SPECIALS)


def test_merges_are_used(tok, ranks):
    ids = tok.encode("the thing there")
    assert len(ids) < len(b"the thing there")
    assert any(len(tok.decode_bytes([i])) > 1 for i in ids)


def test_digits_split_one_per_token(tok):
    # The V1 pattern makes every digit its own word, so no merge can join two digits.
    ids = tok.encode("12345")
    assert [tok.decode([i]) for i in ids] == list("12345")


def test_special_text_becomes_one_token(tok, ranks):
    text = "Human: hi<|separator|>\n\nAssistant: yes<|eos|>"
    ids = tok.encode(text)
    assert ids.count(1) == 1 and ids.count(2) == 1
    assert ids[-1] == 2
    assert tok.decode(ids) == text
    assert tok.encode("<|control1|>") == [4]
    assert ids == _reference_encode(text, ranks, SPECIALS)


def test_special_text_stays_text_when_not_allowed(tok):
    text = "say <|eos|> and <|separator|>"
    ids = tok.encode(text, allow_special=False)
    assert not any(tok.is_special(i) for i in ids)
    assert len(ids) > 4
    assert tok.decode(ids) == text


def test_decode_skip_special(tok):
    ids = tok.encode("hi<|separator|>there<|eos|>")
    assert tok.decode(ids, skip_special=True) == "hithere"


def test_decode_accepts_numpy_and_jax(tok):
    ids = tok.encode("the fox 😀")
    assert tok.decode(np.asarray(ids, np.int32)) == "the fox 😀"
    assert tok.decode(jnp.asarray(ids, jnp.int32)) == "the fox 😀"


def test_partial_utf8_decodes_with_replacement(tok):
    # The crab is not in the training corpus, so its 4 bytes split over several tokens.
    ids = tok.encode("🦀", allow_special=False)
    pieces = [tok.decode_bytes([i]) for i in ids]
    assert len(pieces) >= 2 and b"".join(pieces) == "🦀".encode()
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode(ids) == "🦀"


@pytest.mark.parametrize("bad", [-1, JSON_VOCAB_SIZE, 10**9])
def test_decode_out_of_range_names_id_and_range(tok, bad):
    with pytest.raises(TokenizerError, match=rf"{bad}.*0 <= id < {JSON_VOCAB_SIZE}"):
        tok.decode([FIRST_REGULAR_ID, bad])


def test_decode_unassigned_id(tok, tok_path):
    with pytest.raises(
        TokenizerError, match=r"token id 6 names no token of .*tokenizer\.tok\.json"
    ):
        tok.decode([6])
    with pytest.raises(TokenizerError, match="token id 500 names no token"):
        tok.id_to_piece(500)


@pytest.mark.parametrize("bad", [1.0, "3", None, True])
def test_decode_rejects_non_int(tok, bad):
    with pytest.raises(TokenizerError, match="expected an int"):
        tok.decode([bad])


def test_id_to_piece(tok, ranks):
    assert tok.id_to_piece(2) == "<|eos|>"
    assert tok.id_to_piece(ranks[b"a"]) == "a"
    assert tok.id_to_piece(ranks[b"\xf0"]) == "\\xf0"


def test_file_pat_str_is_used(tmp_path, ranks, tok):
    path = tmp_path / "chars.tok.json"
    write_tok_json(path, ranks, SPECIALS, pat_str=r"(?s:.)")  # every character its own word
    chars = TokJsonTokenizer.from_file(path)
    assert chars.pat_str == r"(?s:.)"
    assert len(chars.encode("the there")) == len("the there")
    assert len(tok.encode("the there")) < len("the there")
    assert chars.decode(chars.encode("日本 😀")) == "日本 😀"


def test_missing_single_byte_is_an_error_not_a_crash(tmp_path, ranks):
    without_z = {b: i for b, i in ranks.items() if b"z" not in b}
    path = tmp_path / "noz.tok.json"
    write_tok_json(path, without_z, SPECIALS)
    t = TokJsonTokenizer.from_file(path)
    assert t.decode(t.encode("the fox")) == "the fox"
    with pytest.raises(TokenizerError, match="byte 0x7a"):
        t.encode("lazy")


# --- tok.json: malformed files -----------------------------------------------------------


def _good_json(ranks) -> dict:
    return {
        "regular_tokens": [{"bytes": list(b), "token": i} for b, i in ranks.items()],
        "special_tokens": [{"bytes": list(t.encode()), "token": i} for t, i in SPECIALS.items()],
        "word_split": "V1",
        "vocab_size": JSON_VOCAB_SIZE,
    }


def _break(kind: str, data: dict) -> None:
    reg, spec = data["regular_tokens"], data["special_tokens"]
    if kind == "no_regular":
        del data["regular_tokens"]
    elif kind == "no_special":
        del data["special_tokens"]
    elif kind == "regular_not_list":
        data["regular_tokens"] = {"a": 1}
    elif kind == "entry_not_object":
        reg[3] = [97, 8]
    elif kind == "entry_no_bytes":
        del reg[3]["bytes"]
    elif kind == "entry_no_token":
        del reg[3]["token"]
    elif kind == "token_str":
        reg[3]["token"] = "11"
    elif kind == "token_bool":
        reg[3]["token"] = True
    elif kind == "token_negative":
        reg[3]["token"] = -5
    elif kind == "byte_too_big":
        reg[3]["bytes"] = [256]
    elif kind == "bytes_empty":
        reg[3]["bytes"] = []
    elif kind == "bytes_not_list":
        reg[3]["bytes"] = "a"
    elif kind == "dup_bytes":
        reg[4]["bytes"] = list(reg[3]["bytes"])
    elif kind == "dup_regular_id":
        reg[4]["token"] = reg[3]["token"]
    elif kind == "dup_special_text":
        spec[1]["bytes"] = list(spec[0]["bytes"])
    elif kind == "dup_special_id":
        spec[4]["token"] = spec[3]["token"]
    elif kind == "special_collides_regular":
        spec[3]["token"] = reg[3]["token"]
    elif kind == "special_not_utf8":
        spec[3]["bytes"] = [0xFF, 0xFE]
    elif kind == "no_eos":
        del spec[2]
    elif kind == "no_pad":
        del spec[0]
    elif kind == "bad_pat_str":
        data["pat_str"] = "(unclosed"
    elif kind == "pat_str_not_str":
        data["pat_str"] = 5
    elif kind == "unknown_word_split":
        data["word_split"] = "V9"
    elif kind == "vocab_size_str":
        data["vocab_size"] = "131072"
    elif kind == "top_level_list":
        data.clear()
    else:
        raise AssertionError(kind)


MALFORMED = {
    "no_regular": r"'regular_tokens' is missing",
    "no_special": r"'special_tokens' is missing",
    "regular_not_list": r"'regular_tokens' must be a list, got dict",
    "entry_not_object": r"regular_tokens\[3\]: expected an object, got list",
    "entry_no_bytes": r"regular_tokens\[3\]: key 'bytes' is missing",
    "entry_no_token": r"regular_tokens\[3\]: key 'token' is missing",
    "token_str": r"regular_tokens\[3\]: 'token' must be an int in \[0, 2147483648\), got '11'",
    "token_bool": r"regular_tokens\[3\]: 'token' must be an int in \[0, 2147483648\), got True",
    "token_negative": r"regular_tokens\[3\]: 'token' must be an int in \[0, 2147483648\), got -5",
    "byte_too_big": r"regular_tokens\[3\]\.bytes: 256 is not a byte value",
    "bytes_empty": r"regular_tokens\[3\]\.bytes: expected a non-empty list",
    "bytes_not_list": r"regular_tokens\[3\]\.bytes: expected a non-empty list",
    "dup_bytes": r"regular_tokens\[4\] repeats the bytes b'\\x03' of id 11",
    "dup_regular_id": r"id 11 is used by two regular tokens",
    "dup_special_text": r"special_tokens\[1\] repeats '<\|pad\|>' of id 0",
    "dup_special_id": r"id 3 is used by two special tokens",
    "special_collides_regular": (
        r"id 11 is used by special token '<\|reserved_3\|>' and by regular token b'\\x03'"
    ),
    "special_not_utf8": r"special_tokens\[3\]: special token bytes .* are not UTF-8",
    "no_eos": r"special token <\|eos\|> is missing",
    "no_pad": r"special token <\|pad\|> is missing",
    "bad_pat_str": r"pat_str is not a valid split pattern",
    "pat_str_not_str": r"'pat_str' must be a non-empty string, got 5",
    "unknown_word_split": r"word_split 'V9' is unknown",
    "vocab_size_str": r"'vocab_size' must be an int in \[1, 2147483648\], got '131072'",
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_file(tmp_path, ranks, kind):
    data = _good_json(ranks)
    _break(kind, data)
    path = tmp_path / "bad.tok.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match=MALFORMED[kind]) as info:
        TokJsonTokenizer.from_file(path)
    assert str(path) in str(info.value)


def test_not_json_and_not_object(tmp_path):
    path = tmp_path / "broken.tok.json"
    path.write_text('{"regular_tokens": [')
    with pytest.raises(TokenizerError, match=r"broken\.tok\.json: not valid JSON"):
        TokJsonTokenizer.from_file(path)
    path.write_text("[]")
    with pytest.raises(
        TokenizerError, match=r"broken\.tok\.json: expected a JSON object, got list"
    ):
        TokJsonTokenizer.from_file(path)
    with pytest.raises(TokenizerError, match="not found"):
        TokJsonTokenizer.from_file(tmp_path / "absent.tok.json")


# --- write_tok_json ----------------------------------------------------------------------


def test_written_file_has_released_layout(tok_path, ranks):
    data = json.loads(tok_path.read_text())
    assert set(data) == {"regular_tokens", "special_tokens", "word_split", "vocab_size"}
    assert data["word_split"] == "V1"
    assert data["vocab_size"] == JSON_VOCAB_SIZE
    ids = [e["token"] for e in data["regular_tokens"]]
    assert ids == sorted(ids) and len(ids) == len(ranks)
    assert {bytes(e["bytes"]): e["token"] for e in data["regular_tokens"]} == ranks
    assert data["special_tokens"][2] == {"bytes": list(b"<|eos|>"), "token": 2}


def test_writer_validates(tmp_path, ranks):
    path = tmp_path / "w.tok.json"
    with pytest.raises(TokenizerError, match="id 3 is used by special token"):
        write_tok_json(path, {**ranks, b"zz-new": 3}, SPECIALS)
    with pytest.raises(TokenizerError, match="<\\|eos\\|> is missing"):
        write_tok_json(path, ranks, {"<|pad|>": 0})
    with pytest.raises(TokenizerError, match="vocab_size must be an int > the largest id"):
        write_tok_json(path, ranks, SPECIALS, vocab_size=100)
    assert not path.exists()


# --- load_tokenizer ----------------------------------------------------------------------


def test_load_tokenizer_file_and_directory(tok_path, tmp_path):
    assert isinstance(load_tokenizer(tok_path), TokJsonTokenizer)
    assert isinstance(load_tokenizer(tok_path.parent), TokJsonTokenizer)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerError, match="looked for tokenizer.tok.json and tokenizer.model"):
        load_tokenizer(empty)
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nowhere")
    other = tmp_path / "vocab.txt"
    other.write_text("x")
    with pytest.raises(TokenizerError, match=r"unknown tokenizer file type '\.txt'"):
        load_tokenizer(other)


def _grok1_model() -> Path:
    if not GROK1_MODEL.is_file():
        pytest.skip(f"Grok-1 tokenizer not found at {GROK1_MODEL} (the shared data folder)")
    return GROK1_MODEL


def test_load_tokenizer_directory_prefers_tok_json(tok_path, tmp_path):
    model = _grok1_model()
    both = tmp_path / "both"
    both.mkdir()
    (both / "tokenizer.tok.json").write_bytes(tok_path.read_bytes())
    (both / "tokenizer.model").symlink_to(model)
    assert isinstance(load_tokenizer(both), TokJsonTokenizer)
    (both / "tokenizer.tok.json").unlink()
    assert isinstance(load_tokenizer(both), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(model), SentencePieceTokenizer)


_IMPORT_CHILD = """
import sys
sys.path.insert(0, {repo!r})
import grok
from grok.tokenizer import load_tokenizer
seen = ["sentencepiece" in sys.modules]
tok = load_tokenizer({path!r})
tok.decode(tok.encode("Hello world"))
seen.append("sentencepiece" in sys.modules)
print(type(tok).__name__, *seen)
"""


def _child_sees(path: Path) -> list[str]:
    """What a fresh interpreter reports after ``import grok`` and loading ``path``."""
    repo = str(Path(__file__).resolve().parents[2])
    code = _IMPORT_CHILD.format(repo=repo, path=str(path))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


def test_sentencepiece_is_imported_only_for_a_sentencepiece_model(tok_path):
    # [type, after import grok, after loading and running the tokenizer]
    assert _child_sees(tok_path) == ["TokJsonTokenizer", "False", "False"]


def test_a_sentencepiece_model_imports_sentencepiece_when_loaded():
    assert _child_sees(_grok1_model()) == ["SentencePieceTokenizer", "False", "True"]


# --- SentencePiece (Grok-1) --------------------------------------------------------------

SP_TEXTS = [
    "Hello world",
    "The answer to life, the universe, and everything is 42.",
    "  two  spaces\n\nnew paragraph\tand a tab",
    "日本語のテキスト 中文 한국어",
    "emoji 😀👍🏽 and accents café naïve",
    "digits 0123456789 3.14159",
    "[BOS] and [EOS] as text",
    "",
]


@pytest.fixture(scope="module")
def sp_pair():
    model = _grok1_model()
    return SentencePieceTokenizer.from_file(model), sentencepiece.SentencePieceProcessor(
        model_file=str(model)
    )


def test_sentencepiece_ids(sp_pair):
    sp, _ = sp_pair
    assert (sp.pad_id, sp.bos_id, sp.eos_id, sp.unk_id) == (0, 1, 2, 3)
    assert sp.vocab_size == 131072
    assert sp.separator_id is None
    assert sp.special_tokens == {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2}
    assert sp.is_special(2) and not sp.is_special(3)
    assert chat_stop_ids(sp) == [2]


@pytest.mark.parametrize("text", SP_TEXTS)
def test_sentencepiece_matches_reference_and_round_trips(sp_pair, text):
    sp, reference = sp_pair
    ids = sp.encode(text)
    assert ids == reference.encode(text, out_type=int)
    assert sp.encode(text, allow_special=False) == ids
    assert sp.encode(text, add_bos=True) == [1, *ids]
    assert sp.decode(ids) == text
    assert sp.decode([1, *ids, 2]) == text  # control tokens decode to nothing


def test_sentencepiece_pieces_and_errors(sp_pair, tmp_path):
    sp, _ = sp_pair
    assert sp.id_to_piece(2) == "[EOS]"
    assert sp.id_to_piece(sp.encode("Hello")[0]) == "▁Hello"
    with pytest.raises(
        TokenizerError, match=r"131072 is out of range: valid ids are 0 <= id < 131072"
    ):
        sp.decode([5, 131072])
    with pytest.raises(TokenizerError, match="not found"):
        SentencePieceTokenizer.from_file(tmp_path / "tokenizer.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match=r"junk\.model: not a readable SentencePiece model"):
        SentencePieceTokenizer.from_file(junk)
    with pytest.raises(TokenizerError, match="has no <\\|separator\\|> token"):
        encode_chat(sp, [("user", "hi")])


# --- chat format -------------------------------------------------------------------------


def test_format_chat_exact_strings():
    messages = [("system", "Be brief."), ("user", "Hi there"), ("assistant", "Hello!")]
    assert format_chat(messages) == (
        "System: Be brief.<|separator|>\n\n"
        "Human: Hi there<|separator|>\n\n"
        "Assistant: Hello!<|separator|>\n\n"
        "Assistant:"
    )
    assert format_chat(messages, add_generation_prompt=False) == (
        "System: Be brief.<|separator|>\n\n"
        "Human: Hi there<|separator|>\n\n"
        "Assistant: Hello!<|separator|>\n\n"
    )
    assert format_chat([("human", "What is 2+2?")]) == (
        "Human: What is 2+2?<|separator|>\n\nAssistant:"
    )
    assert format_chat([]) == "Assistant:"


def test_format_chat_dicts_and_whitespace():
    dicts = [
        {"role": "user", "content": "  padded question \n"},
        {"role": "assistant", "content": " kept as is "},
    ]
    assert format_chat(dicts, add_generation_prompt=False) == (
        "Human: padded question<|separator|>\n\nAssistant:  kept as is <|separator|>\n\n"
    )
    assert format_chat([{"role": "User", "content": "x"}]) == format_chat([("user", "x")])


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([("robot", "hi")], "has role 'robot'"),
        ([{"role": "user"}], "needs 'role' and 'content'"),
        ([("user", 3)], "has int text"),
        ([("user",)], "must be a \\(role, text\\) pair"),
        ("Human: hi", "must be a sequence"),
    ],
)
def test_format_chat_rejects_bad_messages(messages, match):
    with pytest.raises(GenerationError, match=match):
        format_chat(messages)


def test_encode_chat_matches_encoding_the_formatted_prompt(tok):
    messages = [("system", "Be brief."), ("user", "the fox 😀?"), ("assistant", "Yes.\n")]
    for add in (True, False):
        expected = tok.encode(format_chat(messages, add_generation_prompt=add))
        assert encode_chat(tok, messages, add_generation_prompt=add) == expected
    ids = encode_chat(tok, messages)
    assert ids.count(tok.separator_id) == 3
    assert tok.decode(ids) == format_chat(messages)


def test_encode_chat_keeps_special_text_in_messages_as_text(tok):
    messages = [("user", "end here<|eos|> please")]
    ids = encode_chat(tok, messages)
    assert tok.eos_id not in ids
    assert ids.count(tok.separator_id) == 1
    assert tok.decode(ids) == format_chat(messages)
    assert tok.eos_id in tok.encode(format_chat(messages))


def test_chat_stop_ids(tok):
    assert chat_stop_ids(tok) == [2, 1]
