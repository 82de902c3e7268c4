"""Named configs: Grok-2 and Grok-1 as released, tiny test shapes, and the resolver that turns
a command line's "preset or path" into a ``GrokConfig``.

Every number is the one in ``docs/spec.md`` (section 1 for Grok-2, section 3 for
Grok-1), written as the expression it is where it is one (``8192**0.5``, not 90.50966799187809).

Shape letters: V vocab, D model width, N query heads, K kv heads, H head dim, F dense MLP width,
Fe expert width, E experts, k experts per token, L layers.
"""

from __future__ import annotations

import os

from grok.config import GrokConfig, load_config
from grok.errors import ConfigError

GROK2 = GrokConfig(
    vocab_size=131072,  # V
    hidden_size=8192,  # D
    num_hidden_layers=64,  # L
    num_attention_heads=64,  # N
    num_key_value_heads=8,  # K
    head_dim=128,  # H
    intermediate_size=32768,  # F, the residual dense MLP
    moe_intermediate_size=16384,  # Fe
    num_local_experts=8,  # E
    num_experts_per_tok=2,  # k
    residual_moe=True,  # (dense MLP + MoE) / sqrt 2
    rms_norm_eps=1e-5,
    embedding_multiplier_scale=8192**0.5,  # sqrt(D)
    output_multiplier_scale=0.5,
    attn_logit_softcapping=30.0,
    router_logit_softcapping=30.0,
    final_logit_softcapping=50.0,
    attn_temperature_len=1024,
    rope_theta=208533496.0,
    rope_type="original",  # plain RoPE, what the reference engine runs
    max_position_embeddings=131072,  # = original 8192 * scaling_factor 16
    original_max_position_embeddings=8192,
    scaling_factor=16.0,
    extrapolation_factor=1.0,
    attn_factor=1.0,
    beta_fast=8.0,  # YaRN knobs, unused by "original"
    beta_slow=1.0,
)

GROK1 = GrokConfig(
    vocab_size=131072,  # V
    hidden_size=6144,  # D
    num_hidden_layers=64,  # L
    num_attention_heads=48,  # N
    num_key_value_heads=8,  # K
    head_dim=128,  # H
    intermediate_size=0,  # no dense MLP
    moe_intermediate_size=32768,  # Fe
    num_local_experts=8,  # E
    num_experts_per_tok=2,  # k
    residual_moe=False,
    rms_norm_eps=1e-5,
    embedding_multiplier_scale=6144**0.5,  # sqrt(D) = 78.38367176906169
    output_multiplier_scale=3**-0.5,  # 1 / sqrt 3 = 0.5773502691896257, on the tied head
    attn_logit_softcapping=30.0,
    router_logit_softcapping=None,
    final_logit_softcapping=None,
    attn_temperature_len=None,
    rope_theta=10000.0,
    rope_type="original",
    max_position_embeddings=8192,
    attn_output_multiplier=128**-0.5,  # H**-0.5 = 0.08838834764831845
    tie_word_embeddings=True,
    hidden_act="gelu_tanh",
)

# Small enough for a CPU test, with caps and temperature length small enough that each
# of them changes the logits of random weights.
TINY_GROK2 = GROK2.replace(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_local_experts=8,
    num_experts_per_tok=2,
    embedding_multiplier_scale=64**0.5,  # sqrt(D), as Grok-2's is sqrt(8192)
    attn_logit_softcapping=1.5,
    router_logit_softcapping=0.8,
    final_logit_softcapping=2.0,
    attn_temperature_len=4,
    rope_theta=10000.0,
    max_position_embeddings=128,
    original_max_position_embeddings=16,
    scaling_factor=8.0,
)

TINY_GROK1 = GROK1.replace(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    moe_intermediate_size=48,
    embedding_multiplier_scale=64**0.5,  # sqrt(D)
    attn_logit_softcapping=1.5,
    attn_output_multiplier=0.25,  # larger than H**-0.5 so the cap at 1.5 acts
    max_position_embeddings=128,
)

PRESETS: dict[str, GrokConfig] = {
    "grok2": GROK2,
    "grok1": GROK1,
    "tiny-grok2": TINY_GROK2,
    "tiny-grok1": TINY_GROK1,
}


def get_preset(name: str) -> GrokConfig:
    """A preset by name: ``grok2``, ``grok1``, ``tiny-grok2``, ``tiny-grok1``.

    The benchmarks' shapes live with them, in ``grok/bench/shapes.py``.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None


def resolve_config(name_or_path: str | os.PathLike[str]) -> GrokConfig:
    """A preset name (``grok2``...) or a path: a ``config.json`` or a checkpoint directory.

    A name is looked up first; anything else is read with ``grok.config.load_config``. A value
    that is neither a preset nor an existing path is a ConfigError listing the presets.
    """
    text = os.fspath(name_or_path)
    if text in PRESETS:
        return PRESETS[text]
    if not os.path.exists(text):
        raise ConfigError(
            f"{text!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing "
            "config.json or checkpoint directory"
        )
    return load_config(text)
