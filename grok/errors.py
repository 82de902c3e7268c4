"""Exception classes of the library.

Every error the library raises on bad input is one of these, so callers can catch
``GrokError`` and still tell a broken checkpoint from a bad config or a bad prompt.
Messages name the file, tensor or field and say what was expected and what was found.
"""

from __future__ import annotations


class GrokError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(GrokError, ValueError):
    """A config is missing a field, has a field of the wrong type, or contradicts itself."""


class CheckpointError(GrokError):
    """A checkpoint file or tensor is missing, truncated, corrupt, unexpected or mis-shaped."""


class UnsafePickleError(CheckpointError):
    """A pickled Grok-1 file asked to construct something outside the allowed set."""


class ShardingError(GrokError, ValueError):
    """A device mesh cannot hold the model as asked (an axis does not divide a dimension)."""


class MemoryPlanError(GrokError):
    """The weights or KV cache would not fit in the memory of a device."""


class TokenizerError(GrokError, ValueError):
    """A tokenizer file is missing or malformed, or a token id is out of range."""


class GenerationError(GrokError, ValueError):
    """A generation request cannot be served (prompt too long, bad sampler settings, ...)."""
