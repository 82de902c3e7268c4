"""The Grok-2 chat format (``docs/spec.md`` section 5): prompts, their ids, turn-ending ids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from grok.errors import GenerationError, TokenizerError
from grok.tokenizer.base import Tokenizer
from grok.tokenizer.tok_json import SEPARATOR_TOKEN

# Roles a message may name -> the prefix of its turn.
_ROLE_PREFIX = {
    "user": "Human:",
    "human": "Human:",
    "system": "System:",
    "assistant": "Assistant:",
}
_TURN_END = SEPARATOR_TOKEN + "\n\n"
GENERATION_PROMPT = "Assistant:"


def _chat_turns(messages: Sequence[tuple[str, str]] | Sequence[Mapping[str, str]]) -> list[str]:
    """``"{Prefix} {text}"`` of each message, validated; the text of user and system turns is
    stripped of surrounding whitespace, as the served Grok-2 chat template does."""
    if isinstance(messages, str | bytes | Mapping):
        raise GenerationError(
            f"chat messages must be a sequence of (role, text) pairs or role/content dicts, "
            f"got {type(messages).__name__}"
        )
    turns = []
    for n, message in enumerate(messages):
        if isinstance(message, Mapping):
            if "role" not in message or "content" not in message:
                raise GenerationError(f"chat message {n} needs 'role' and 'content' keys")
            role, text = message["role"], message["content"]
        elif isinstance(message, tuple | list) and len(message) == 2:
            role, text = message
        else:
            raise GenerationError(
                f"chat message {n} must be a (role, text) pair or a role/content dict, "
                f"got {message!r}"
            )
        if not isinstance(role, str) or role.lower() not in _ROLE_PREFIX:
            raise GenerationError(
                f"chat message {n} has role {role!r}; expected one of {sorted(_ROLE_PREFIX)}"
            )
        if not isinstance(text, str):
            raise GenerationError(f"chat message {n} has {type(text).__name__} text, expected str")
        role = role.lower()
        if role != "assistant":
            text = text.strip()
        turns.append(f"{_ROLE_PREFIX[role]} {text}")
    return turns


def format_chat(
    messages: Sequence[tuple[str, str]] | Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
) -> str:
    """The Grok-2 chat prompt for ``messages``.

    Each message becomes ``"Human: {text}<|separator|>\\n\\n"`` (roles ``user``/``human``),
    ``"System: ..."`` or ``"Assistant: ..."``; with ``add_generation_prompt`` the prompt ends with
    ``"Assistant:"``. User and system text is stripped of surrounding whitespace, assistant text
    is kept as is (as in the served template). Messages are ``(role, text)`` pairs or
    ``{"role": ..., "content": ...}`` dicts.

    The result holds special-token text: encode it with ``allow_special=True``. Text that
    itself contains special-token text then becomes special tokens too; :func:`encode_chat`
    encodes message text as plain text instead.
    """
    prompt = "".join(turn + _TURN_END for turn in _chat_turns(messages))
    return prompt + GENERATION_PROMPT if add_generation_prompt else prompt


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[tuple[str, str]] | Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of :func:`format_chat`'s prompt, with message text encoded as plain text.

    Equal to ``tokenizer.encode(format_chat(messages))`` when no message contains
    special-token text; when one does, that text stays text here, so a user cannot forge a
    separator or an end of sequence. Needs a tokenizer with a separator (Grok-2's).
    """
    separator_id = tokenizer.separator_id
    if separator_id is None:
        raise TokenizerError(
            f"{type(tokenizer).__name__} has no {SEPARATOR_TOKEN} token, so it cannot encode "
            "the Grok-2 chat format"
        )
    ids: list[int] = []
    # Special tokens split the text for BPE, so each turn's text (with the "\n\n" that follows
    # the previous separator) encodes on its own exactly as it does inside the whole prompt.
    pending = ""
    for turn in _chat_turns(messages):
        ids += tokenizer.encode(pending + turn, allow_special=False)
        ids.append(separator_id)
        pending = "\n\n"
    tail = pending + (GENERATION_PROMPT if add_generation_prompt else "")
    if tail:
        ids += tokenizer.encode(tail, allow_special=False)
    return ids


def chat_stop_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids that end an assistant turn: ``<|eos|>`` and, where it exists, ``<|separator|>``."""
    stops = [tokenizer.eos_id]
    if tokenizer.separator_id is not None:
        stops.append(tokenizer.separator_id)
    return stops
