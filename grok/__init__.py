"""grok: a JAX + Haiku implementation of the Grok-2 architecture, with Grok-1 as a preset."""

from grok.config import GROK1, GROK2, TINY_GROK1, TINY_GROK2, GrokConfig, get_preset, load_config
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

__all__ = [
    "GROK1",
    "GROK2",
    "TINY_GROK1",
    "TINY_GROK2",
    "CheckpointError",
    "ConfigError",
    "GenerationError",
    "GrokConfig",
    "GrokError",
    "MemoryPlanError",
    "ShardingError",
    "TokenizerError",
    "UnsafePickleError",
    "get_preset",
    "load_config",
]
