"""``grok-train-tokenizer``: trains the built-in byte-level BPE, writes ``tokenizer.tok.json``.

The BPE is learned by the ``tokenizers`` package on the training topics of
``pydoc_data.topics`` (see ``grok.data``), with the Grok-2 "V1" word split, so the words it
merges within are exactly the words tiktoken will cut at encode time. The result is written in
the released format (spec section 5): special tokens first (``<|pad|>`` 0, ``<|separator|>``
1, ``<|eos|>`` 2, as in the release), then the 256 single bytes, then the merged tokens in the
order they were learned (id = BPE rank). The file is read back through
``grok.tokenizer.TokJsonTokenizer`` and its encoding is compared with the trainer's own.

    grok-train-tokenizer [--vocab-size 2048] [--out grok/builtin]

It needs the ``tokenizers`` package (``pip install -e ".[train]"``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from grok import data
from grok.builtin import builtin_dir
from grok.cli.common import (
    EXIT_ERROR,
    Parser,
    UsageError,
    nonnegative_int,
    positive_float,
    positive_int,
    report,
    run_program,
)
from grok.errors import TokenizerError
from grok.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    SEPARATOR_TOKEN,
    TOK_JSON_NAME,
    V1_PAT_STR,
    TokJsonTokenizer,
    write_tok_json,
)

try:  # an optional dependency (the "train" extra); main() says how to install it
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
except ModuleNotFoundError:
    Tokenizer = None

PROG = "grok-train-tokenizer"
SPECIAL_TOKENS = (PAD_TOKEN, SEPARATOR_TOKEN, EOS_TOKEN)  # ids 0, 1, 2 as in the release


def _byte_decoder() -> dict[str, int]:
    """The inverse of the byte-level alphabet: printable stand-in character -> byte."""
    chars = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel's alphabet is the GPT-2 table; rebuild its byte order to invert it.
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    if set(table) != set(chars):
        raise TokenizerError("tokenizers' ByteLevel alphabet is not the expected byte table")
    return table


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of ``vocab_size - 3`` regular tokens (3 ids are the specials)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(V1_PAT_STR), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return bpe


def to_tok_json(bpe: Tokenizer, path: Path, vocab_size: int) -> TokJsonTokenizer:
    """Writes the BPE as a released-format ``tokenizer.tok.json`` and loads it back."""
    decode = _byte_decoder()
    vocab = bpe.get_vocab()  # token string -> trainer id; ids 0..255 the bytes, then merges
    offset = len(SPECIAL_TOKENS)
    singles = sorted((decode[t], i) for t, i in vocab.items() if len(t) == 1)
    merged = sorted((i, t) for t, i in vocab.items() if len(t) > 1)
    regular: dict[bytes, int] = {}
    for rank, (byte, _) in enumerate(singles):
        regular[bytes([byte])] = offset + rank
    for i, token in merged:
        regular[bytes(decode[c] for c in token)] = offset + i
    if sorted(regular.values()) != list(range(offset, offset + len(vocab))):
        raise TokenizerError(f"{path}: BPE ids are not contiguous after the specials")
    special = {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    write_tok_json(path, regular, special, vocab_size=vocab_size)
    return TokJsonTokenizer.from_file(path)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``grok-train-tokenizer``."""
    p = Parser(prog=PROG, description="Train the built-in model's byte-level BPE.")
    p.add_argument("--vocab-size", type=positive_int, default=2048, help="V, specials included")
    p.add_argument("--heldout-fraction", type=positive_float, default=0.1)
    p.add_argument("--split-seed", type=nonnegative_int, default=0)
    p.add_argument("--out", type=Path, default=builtin_dir(), help="the folder to write into")
    return p


def run(args: argparse.Namespace) -> None:
    """Trains the BPE, writes ``tokenizer.tok.json`` and checks it against the trainer."""
    if args.vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise UsageError(
            f"--vocab-size {args.vocab_size}: must exceed the 256 bytes and "
            f"{len(SPECIAL_TOKENS)} special tokens"
        )
    if args.heldout_fraction >= 1:
        raise UsageError(f"--heldout-fraction {args.heldout_fraction}: must be below 1")
    corpus = data.split_corpus(data.topics(), args.heldout_fraction, args.split_seed)
    texts = [text for _, text in corpus.train]
    bpe = train_bpe(texts, args.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    tok = to_tok_json(bpe, args.out / TOK_JSON_NAME, args.vocab_size)

    decode = _byte_decoder()
    ids = {tok.decode_bytes([i]): i for i in range(len(SPECIAL_TOKENS), tok.vocab_size)}
    ours_of = {t: ids[bytes(decode[c] for c in t)] for t in bpe.get_vocab()}
    same = total = 0
    for _, text in corpus.train + corpus.heldout:
        ours = tok.encode(text, allow_special=False)
        theirs = [ours_of[t] for t in bpe.encode(text).tokens]
        same += ours == theirs
        total += 1
        if tok.decode(ours) != text:
            raise TokenizerError(f"{args.out / TOK_JSON_NAME}: decode(encode(x)) != x")
    nbytes = sum(len(t.encode()) for _, t in corpus.train + corpus.heldout)
    ntok = sum(len(tok.encode(t, allow_special=False)) for _, t in corpus.train + corpus.heldout)
    print(
        f"wrote {args.out / TOK_JSON_NAME}: V={tok.vocab_size}, {nbytes / ntok:.2f} bytes/token, "
        f"tiktoken encoding equals the trainer's on {same}/{total} topics"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``grok-train-tokenizer``."""
    if Tokenizer is None:
        report(PROG, 'needs the tokenizers package: pip install -e ".[train]"')
        return EXIT_ERROR
    return run_program(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
