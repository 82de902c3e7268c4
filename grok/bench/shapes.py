"""The shapes the benchmarks run, by name; they live here, with the benchmarks, not with the
library's presets.

- ``bench``: Grok-2's knobs (rope, caps, temperature, residual MoE) at a CPU-sized width:
  V 32000, D 512, 8 layers, 8/2 heads of 64, 8 experts top-2 of 1024, a dense MLP of 1024.
- ``bench-grok1``: the same shape with Grok-1's knobs and no dense MLP, the shape Hugging Face
  ``MixtralForCausalLM`` can run, so the two engines are compared on it.
- ``full-width-layer``: one Grok-2 decoder layer at its real widths (D 8192, 64/8 heads of 128,
  dense 32768, experts 8 x 16384, top-2) with a small vocab, for the bandwidth-roofline check.

``resolve(name)`` also takes what ``grok.presets.resolve_config`` does: the library's presets,
a checkpoint directory or a ``config.json`` path.
"""

from __future__ import annotations

from grok.config import GrokConfig
from grok.presets import GROK1, GROK2, resolve_config

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
    """A bench shape by name, else ``grok.presets.resolve_config`` (a preset or a path)."""
    if name_or_path in BENCH_SHAPES:
        return BENCH_SHAPES[name_or_path]
    return resolve_config(name_or_path)
