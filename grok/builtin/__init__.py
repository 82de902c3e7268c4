"""The built-in model: a small Grok-2-architecture model trained on CPython's reference text.

``builtin_dir()`` is the directory holding its ``config.json``, its weights in the released
safetensors layout (bfloat16, experts split over TP files) and ``tokenizer.tok.json``, so
``grok.load_pretrained("builtin")`` and ``scripts/sample.py`` work with no download. It was
trained by ``scripts/train_tokenizer.py`` then ``scripts/train.py`` (``training.json`` beside
the weights records the run and its held-out loss).

``BUILTIN_CONFIG`` is the architecture: every Grok-2 feature is on (GQA, attention, router and
final soft caps, the attention temperature, residual MoE, untied head, rope "original", exact
GELU), at a size that trains in about a quarter of an hour on two CPU cores.
"""

from __future__ import annotations

from pathlib import Path

from grok.config import GrokConfig
from grok.presets import GROK2

BUILTIN_CONFIG: GrokConfig = GROK2.replace(
    vocab_size=2048,  # the BPE trained on ~465 KB of text: 3 specials + 256 bytes + merges
    hidden_size=128,  # D: ~1.9M parameters in all, ~1.5K tokens/s of training on 2 cores
    num_hidden_layers=4,  # L
    num_attention_heads=4,  # N, with H = 32 so N * H = D as in Grok-2
    num_key_value_heads=2,  # K: GQA with G = 2
    head_dim=32,  # H
    intermediate_size=256,  # F = 2 D, the dense (residual) MLP
    moe_intermediate_size=128,  # Fe = D per expert (Grok-2's Fe = 2 D; halved for speed)
    num_local_experts=4,  # E
    num_experts_per_tok=2,  # k, as in Grok-2
    embedding_multiplier_scale=128**0.5,  # sqrt(D), as Grok-2's is sqrt(8192)
    # Caps stay at Grok-2's values (30, 30, 50), output multiplier 0.5, eps 1e-5.
    attn_temperature_len=128,  # the training window: the temperature acts beyond it
    rope_theta=10000.0,  # Grok-2's 208533496 is for a 131K context; 10^4 suits 512
    max_position_embeddings=512,  # rotary table length; trained on windows of 128
    original_max_position_embeddings=512,  # only YaRN reads this; no context extension
    scaling_factor=1.0,  # only YaRN reads this
)


def builtin_dir() -> Path:
    """The directory of the built-in model (config.json, safetensors, tokenizer.tok.json)."""
    return Path(__file__).resolve().parent
