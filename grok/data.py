"""The built-in model's corpus: the English text of CPython's ``pydoc_data.topics``.

Every CPython ships this module (about 465 KB of reference text in 79 topics), so training
needs no download. Topics are split into a training and a held-out set by a seeded shuffle
of their names, and each split is one token stream with ``<|eos|>`` between topics.

Batches are random windows of ``T + 1`` tokens; the windows of step ``n`` depend only on
(seed, n), so a resumed run sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np

from grok.errors import GrokError
from grok.tokenizer import Tokenizer


class Corpus(NamedTuple):
    """The training and held-out topics, as (name, text) pairs in name order."""

    train: list[tuple[str, str]]
    heldout: list[tuple[str, str]]


def topics() -> list[tuple[str, str]]:
    """Every (name, text) of ``pydoc_data.topics``, sorted by name."""
    from pydoc_data.topics import topics as table

    return sorted(table.items())


def corpus_digest(docs: list[tuple[str, str]]) -> str:
    """SHA-256 of the documents, so a checkpoint can say which Python's text trained it."""
    h = hashlib.sha256()
    for name, text in docs:
        h.update(name.encode("utf-8") + b"\0" + text.encode("utf-8") + b"\0")
    return h.hexdigest()


def split_corpus(docs: list[tuple[str, str]], heldout_fraction: float, seed: int) -> Corpus:
    """Holds out ``round(len(docs) * heldout_fraction)`` (at least 1) topics, chosen by seed."""
    if not 0.0 < heldout_fraction < 1.0:
        raise GrokError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if len(docs) < 2:
        raise GrokError(f"the corpus needs at least 2 documents to split, got {len(docs)}")
    count = min(len(docs) - 1, max(1, round(len(docs) * heldout_fraction)))
    order = np.random.default_rng(seed).permutation(len(docs))
    held = set(order[:count].tolist())
    return Corpus(
        train=[d for i, d in enumerate(docs) if i not in held],
        heldout=[d for i, d in enumerate(docs) if i in held],
    )


def encode_documents(tokenizer: Tokenizer, docs: list[tuple[str, str]]) -> np.ndarray:
    """One int32 token stream [N]: each document's tokens followed by ``<|eos|>``.

    Document text is encoded as ordinary text (a special token's spelling inside a topic
    stays text).
    """
    stream: list[int] = []
    for _, text in docs:
        stream.extend(tokenizer.encode(text, allow_special=False))
        stream.append(tokenizer.eos_id)
    return np.asarray(stream, np.int32)


def batch_at(stream: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int) -> np.ndarray:
    """The training batch of ``step``: int32 [B, T + 1] windows at seeded random offsets."""
    if stream.shape[0] < seq_len + 1:
        raise GrokError(
            f"token stream of {stream.shape[0]} tokens is shorter than one window of {seq_len + 1}"
        )
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, stream.shape[0] - seq_len, size=batch_size)
    return np.stack([stream[s : s + seq_len + 1] for s in starts])


def eval_windows(stream: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping windows int32 [W, T + 1] covering the stream (for eval).

    Each window's last token is the next window's first, so every token but the first is
    predicted exactly once; a tail shorter than a window is dropped.
    """
    count = (stream.shape[0] - 1) // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise GrokError(
            f"token stream of {stream.shape[0]} tokens is shorter than one window of {seq_len + 1}"
        )
    return np.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(count)])


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy in nats of the tokens' own empirical unigram distribution (a baseline loss).

    This is the cross-entropy of the best context-free model fitted to these very tokens,
    so it is a lower bound for any unigram model and a fair bar for a held-out loss.
    """
    counts = np.bincount(np.asarray(tokens).ravel(), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
