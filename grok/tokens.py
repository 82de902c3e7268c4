"""The one check of token ids entering the model (``Model.logits``, ``generate``).

Shape letters: B batch, T tokens, V vocab (``vocab_size``), P context
(``max_position_embeddings``).
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from grok.errors import GenerationError, TokenizerError


def check_token_ids(
    tokens: Any, *, vocab_size: int, context: int, ndim: int = 2, what: str = "tokens"
) -> np.ndarray:
    """``tokens`` as an int64 array of ``ndim`` dims ([B, T] or [T]), every id in [0, V).

    Raises GenerationError for text, non-integer values (``1.7`` is not truncated to 1), a
    ragged or mis-ranked array, an empty sequence, or more than ``context`` tokens; and
    TokenizerError naming the first id outside [0, V).

    Args:
      tokens: ids as nested lists, tuples or a numpy/JAX array.
      vocab_size: V.
      context: P, the most tokens a sequence may hold.
      ndim: 2 for a batch [B, T], 1 for one sequence [T].
      what: how messages name the input ("tokens", "prompt 3").
    """
    if isinstance(tokens, str | bytes):
        raise GenerationError(f"{what} is text: encode it with a tokenizer first")
    try:
        array = np.asarray(tokens)
    except (ValueError, TypeError) as err:  # ragged nesting
        raise GenerationError(f"{what} must be a rectangular array of token ids ({err})") from None
    if array.ndim != ndim:
        shape = "[B, T]" if ndim == 2 else "[T]"
        raise GenerationError(f"{what} must be {shape} token ids, got shape {list(array.shape)}")
    if array.dtype.kind in "US":
        raise GenerationError(f"{what} is text: encode it with a tokenizer first")
    if array.size == 0:
        raise GenerationError(f"{what} is empty: a sequence needs at least one token")
    if array.dtype.kind == "O":  # Python ints too large for int64, or other objects
        for value in array.flat:
            try:
                index = operator.index(value)
            except TypeError:
                raise GenerationError(
                    f"{what} holds {type(value).__name__} {value!r:.40}, not an int token id"
                ) from None
            if not 0 <= index < vocab_size:
                raise TokenizerError(
                    f"{what}: token id {index} is outside the vocabulary [0, {vocab_size})"
                )
        array = array.astype(np.int64)  # every id was in range, so this fits
    if array.dtype.kind not in "iu":
        example = array.flat[0].item()
        raise GenerationError(
            f"{what} must hold integer token ids, got {array.dtype} values (e.g. {example!r}); "
            "ids are not rounded"
        )
    if array.shape[-1] > context:
        raise GenerationError(
            f"{what} has {array.shape[-1]} tokens, more than the context "
            f"(max_position_embeddings = {context})"
        )
    bad = (array < 0) | (array >= vocab_size)
    if bad.any():
        raise TokenizerError(
            f"{what}: token id {int(array[bad][0])} is outside the vocabulary [0, {vocab_size})"
        )
    return array.astype(np.int64, copy=False)
