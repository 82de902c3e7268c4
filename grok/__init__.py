"""grok: a JAX + Haiku implementation of the Grok-2 architecture, with Grok-1 as a preset.

Start with ``grok.load_pretrained(path)`` for a checkpoint in the released layout, or
``grok.GrokConfig`` and ``grok.model`` for the modules themselves.
"""

from grok.api import Model, load_pretrained
from grok.config import GrokConfig, load_config
from grok.errors import (
    CheckpointError,
    ConfigError,
    GenerationError,
    GrokError,
    MemoryPlanError,
    ShardingError,
    TokenizerError,
    UnsafePickleError,
)
from grok.generate import GenerationResult
from grok.kv_cache import KVCache
from grok.presets import GROK1, GROK2, TINY_GROK1, TINY_GROK2, get_preset
from grok.sampling import Sampler
from grok.tokenizer import format_chat, load_tokenizer

__all__ = [
    "GROK1",
    "GROK2",
    "TINY_GROK1",
    "TINY_GROK2",
    "CheckpointError",
    "ConfigError",
    "GenerationError",
    "GenerationResult",
    "GrokConfig",
    "GrokError",
    "KVCache",
    "MemoryPlanError",
    "Model",
    "Sampler",
    "ShardingError",
    "TokenizerError",
    "UnsafePickleError",
    "format_chat",
    "get_preset",
    "load_config",
    "load_pretrained",
    "load_tokenizer",
]
