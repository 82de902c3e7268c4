"""Generation benchmark: time to first token and decode tokens/s at batch 1 and batch 8.

    python scripts/bench_generate.py                      # the small config below, float32
    python scripts/bench_generate.py --dtype bfloat16 --new-tokens 256

Weights are random (``grok.testing.random_params``: the speed does not depend on them). Each
batch size runs once to compile and then ``--repeats`` times; the best run is reported. The KV
cache's bytes per token are measured from the cache the run allocates and printed beside the
formula of spec section 1, ``L * 2 * K * H * bytes``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from grok.api import Model
from grok.config import GrokConfig
from grok.generate import bucket_length
from grok.kv_cache import KVCache
from grok.presets import GROK2, TINY_GROK2
from grok.testing import random_params

# A small Grok-2-shaped model: every feature on (residual MoE, GQA with G = 4, caps,
# temperature), about 30M parameters, so one CPU core decodes it at a readable speed.
SMALL = TINY_GROK2.replace(
    vocab_size=4096,
    hidden_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    intermediate_size=1024,
    moe_intermediate_size=256,
    embedding_multiplier_scale=512**0.5,
    attn_temperature_len=64,
    max_position_embeddings=1024,
    original_max_position_embeddings=128,
)


def kv_bytes_per_token(config: GrokConfig, dtype: jnp.dtype) -> tuple[int, int]:
    """(measured from a cache's arrays, spec formula L * 2 * K * H * bytes) per token."""
    cache = jax.eval_shape(lambda: KVCache.create(config, 1, 16, dtype))
    measured = (cache.k.size * cache.k.dtype.itemsize + cache.v.size * cache.v.dtype.itemsize) // 16
    formula = (
        config.num_hidden_layers
        * 2
        * config.num_key_value_heads
        * config.head_dim
        * jnp.dtype(dtype).itemsize
    )
    return measured, formula


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    config = SMALL

    model = Model(config, random_params(config, dtype=dtype), dtype=dtype)
    print(
        f"config: L={config.num_hidden_layers} D={config.hidden_size} "
        f"N={config.num_attention_heads} K={config.num_key_value_heads} H={config.head_dim} "
        f"E={config.num_local_experts} k={config.num_experts_per_tok} V={config.vocab_size}, "
        f"{model.num_parameters() / 1e6:.1f}M parameters, {args.dtype}, "
        f"device {jax.devices()[0].device_kind}"
    )
    cache_len = bucket_length(args.prompt_len + args.new_tokens, config.max_position_embeddings)
    print(
        f"prompt {args.prompt_len} tokens (bucket {bucket_length(args.prompt_len, 10**9)}), "
        f"{args.new_tokens} new tokens, cache {cache_len} slots"
    )
    rng = np.random.default_rng(1)
    for batch in args.batch:
        prompts = rng.integers(0, config.vocab_size, (batch, args.prompt_len)).tolist()
        start = time.perf_counter()
        model.generate(prompts, max_new_tokens=args.new_tokens)  # compiles
        compile_s = time.perf_counter() - start
        best = None
        for _ in range(args.repeats):
            r = model.generate(prompts, max_new_tokens=args.new_tokens)
            if best is None or r.decode_tokens_per_s > best.decode_tokens_per_s:
                best = r
        steps_per_s = best.num_decode_tokens / batch / best.decode_time_s
        print(
            f"batch {batch}: time to first token {best.time_to_first_token_s * 1e3:8.1f} ms | "
            f"decode {best.decode_tokens_per_s:8.1f} tokens/s ({steps_per_s:6.1f} steps/s, "
            f"{best.num_decode_tokens} tokens) | first call with compile {compile_s:.1f} s"
        )

    for name, cfg, dt in (("this run", config, dtype), ("Grok-2", GROK2, jnp.bfloat16)):
        measured, formula = kv_bytes_per_token(cfg, dt)
        print(
            f"KV cache per token ({name}, {jnp.dtype(dt).name}): {measured:,} bytes measured; "
            f"spec L*2*K*H*bytes = {cfg.num_hidden_layers}*2*{cfg.num_key_value_heads}*"
            f"{cfg.head_dim}*{jnp.dtype(dt).itemsize} = {formula:,} bytes"
        )


if __name__ == "__main__":
    main()
