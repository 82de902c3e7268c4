"""The shapes the benchmarks run, by name; they live here, with the benchmarks, not with the
library's presets.

- ``bench``: Grok-2's knobs (rope, caps, temperature, residual MoE) at a CPU-sized width:
  V 32000, D 512, 8 layers, 8/2 heads of 64, 8 experts top-2 of 1024, a dense MLP of 1024.
- ``bench-grok1``: the same shape with Grok-1's knobs and no dense MLP, the shape Hugging Face
  ``MixtralForCausalLM`` can run, so the two engines are compared on it.
- ``full-width-layer``: one Grok-2 decoder layer at its real widths (D 8192, 64/8 heads of 128,
  dense 32768, experts 8 x 16384, top-2) with a small vocab, for the bandwidth-roofline check.

``resolve(name)`` also takes the library's presets (``grok.config.PRESETS``), a checkpoint
directory or a ``config.json`` path.
"""

from __future__ import annotations

import os

from grok.config import GROK1, GROK2, PRESETS, GrokConfig, load_config
from grok.errors import ConfigError

_BENCH_SHAPE = dict(
    vocab_size=32000,
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    moe_intermediate_size=1024,
    num_local_experts=8,
    num_experts_per_tok=2,
    embedding_multiplier_scale=512**0.5,  # as Grok-2's is sqrt(D)
)

# Grok-2's rope, caps and temperature, with a dense MLP as wide as an expert.
BENCH = GROK2.replace(**_BENCH_SHAPE, intermediate_size=1024)

# The same shape with Grok-1's knobs and no dense MLP: the shape Mixtral can run.
BENCH_GROK1 = GROK1.replace(**_BENCH_SHAPE, attn_output_multiplier=64**-0.5)

# One Grok-2 layer at full width; a 1024-token vocab keeps the head out of the byte count.
FULL_WIDTH_LAYER = GROK2.replace(num_hidden_layers=1, vocab_size=1024, max_position_embeddings=4096)

BENCH_SHAPES: dict[str, GrokConfig] = {
    "bench": BENCH,
    "bench-grok1": BENCH_GROK1,
    "full-width-layer": FULL_WIDTH_LAYER,
}


def resolve(name_or_path: str) -> GrokConfig:
    """A bench shape or library preset by name, a checkpoint directory or a config.json."""
    if name_or_path in BENCH_SHAPES:
        return BENCH_SHAPES[name_or_path]
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    if os.path.isdir(name_or_path):
        return load_config(name_or_path)
    if os.path.isfile(name_or_path):
        return load_config(os.path.dirname(os.path.abspath(name_or_path)))
    known = ", ".join(sorted({*BENCH_SHAPES, *PRESETS}))
    raise ConfigError(f"unknown shape {name_or_path!r}: not a file or directory; known: {known}")
