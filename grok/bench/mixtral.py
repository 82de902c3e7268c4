"""The Hugging Face peer: ``MixtralForCausalLM`` of the bench shape, greedy ``generate``
(``pip install -e ".[bench]"`` installs torch and transformers).

Glossary: B batch, T prompt tokens, N new tokens.

Figures per batch size, as grok's child reports them: prefill of the T-token prompt into a
KV cache (the head at the last position only), time to first token, decode tokens per second
over the batch (N - 1 steps after the first token) and the whole generation, from one
``generate`` call timed by a streamer that notes the time of each token.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from typing import Any

import numpy as np

from grok.bench.harness import median_s
from grok.bench.shapes import resolve
from grok.errors import ConfigError

MIXTRAL_FORMATS = ("float32", "bfloat16")


def missing() -> str | None:
    """Why this peer cannot run here (a package not installed), or None; imports nothing."""
    for package in ("torch", "transformers"):
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed (pip install -e '.[bench]')"
    return None


def mixtral_config(config, context: int):
    """The ``transformers.MixtralConfig`` of a grok config (ConfigError where Mixtral cannot
    express it: a dense MLP beside the experts)."""
    from transformers import MixtralConfig

    c = config
    if c.has_dense_mlp:
        raise ConfigError(
            "the shape has a dense MLP beside the experts, which Mixtral cannot express: "
            "compare on bench-grok1, or leave mixtral out of --engines"
        )
    return MixtralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.moe_intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        num_local_experts=c.num_local_experts,
        num_experts_per_tok=c.num_experts_per_tok,
        max_position_embeddings=max(4096, context),
        tie_word_embeddings=c.tie_word_embeddings,
        rope_theta=c.rope_theta,
    )


def mixtral_child(args: argparse.Namespace) -> dict[str, Any]:
    """Prefill, time to first token, decode and the whole generation at each batch size."""
    import torch
    import transformers
    from transformers import MixtralForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(args.threads)
    c = resolve(args.shape)
    torch.manual_seed(0)
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = MixtralForCausalLM(mixtral_config(c, args.T + args.N)).to(tdtype).eval()
    prompts = np.random.default_rng(0).integers(0, c.vocab_size, (max(args.batch), args.T))
    out: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }

    class Clock(BaseStreamer):
        """Times each step of ``generate``: put() gets the prompt, then each new token."""

        def __init__(self):
            self.times = [time.perf_counter()]

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def gen(ids, n) -> list[float]:
        clock = Clock()
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            streamer=clock,
        )
        return clock.times  # [call, prompt seen, token 1, ..., token n]

    with torch.inference_mode():
        for b in args.batch:
            ids = torch.as_tensor(prompts[:b])
            gen(ids, args.N)  # warm-up
            times = gen(ids, args.N)
            out[f"b{b}"] = {
                "prefill_s": median_s(
                    lambda ids=ids: model(ids, use_cache=True, logits_to_keep=1).logits, 3
                ),
                "ttft_s": times[2] - times[0],
                "decode_tok_s": b * (args.N - 1) / (times[-1] - times[2]),
                "generate_s": times[-1] - times[0],
            }
    return out
