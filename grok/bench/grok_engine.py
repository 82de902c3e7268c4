"""grok's children: the engine on a bench shape (prefill, time to first token, decode, compile
time at each batch size), compile time against depth, and one long prompt.

Glossary: B batch, T prompt tokens, N new tokens, V vocab.

Each child takes the benchmark's parsed arguments and returns its figures as a dict (the
harness prints it as JSON). ``args.dtype`` is the weight format: ``float32``, ``bfloat16``, or
``fp8`` (``quantize="fp8"``: float8_e4m3fn matrices with per-channel scales, bf16
activations).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from grok.bench.harness import median_s
from grok.bench.shapes import resolve

GROK_FORMATS = ("float32", "bfloat16", "fp8")


def weights_of(fmt: str) -> tuple[str, str | None]:
    """(compute dtype, ``quantize``) of a grok weight format."""
    return ("bfloat16", "fp8") if fmt == "fp8" else (fmt, None)


def bench_model(config, fmt: str, seed: int = 0):
    """A ``grok.Model`` of ``config`` with random weights (``grok.testing.random_params``) in
    the weight format ``fmt``."""
    import jax.numpy as jnp

    from grok.api import Model
    from grok.testing import random_params

    dtype_name, quant = weights_of(fmt)
    dtype = jnp.dtype(dtype_name)
    params = random_params(config, seed, dtype=dtype, quant=quant)
    return Model(config, params, dtype=dtype, quant=quant)


def grok_child(args: argparse.Namespace) -> dict[str, Any]:
    """Prefill, time to first token, decode and compile time at each batch size."""
    import jax
    import jax.numpy as jnp

    from grok.kv_cache import KVCache

    config = resolve(args.shape)
    model = bench_model(config, args.dtype)
    prompts = np.random.default_rng(0).integers(0, config.vocab_size, (max(args.batch), args.T))
    out: dict[str, Any] = {
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "quantize": model.quant,
        "kernels": type(model.kernels).__name__,
    }
    for b in args.batch:
        rows = prompts[:b].tolist()
        tokens = jnp.asarray(prompts[:b], jnp.int32)  # [B, T]
        positions = jnp.broadcast_to(jnp.arange(args.T, dtype=jnp.int32), (b, args.T))
        lengths = jnp.full((b,), args.T, jnp.int32)
        cache = KVCache.create(config, b, args.T, model.dtype)

        def prefill(tokens=tokens, positions=positions, lengths=lengths, cache=cache):
            logits, new_cache = model.apply(tokens, positions, cache, lengths, lengths - 1)
            jax.block_until_ready((logits, new_cache))

        start = time.perf_counter()
        model.generate(rows, max_new_tokens=args.N)  # compiles prefill and decode
        first_call = time.perf_counter() - start
        res = model.generate(rows, max_new_tokens=args.N)
        total = res.time_to_first_token_s + res.decode_time_s
        out[f"b{b}"] = {
            "prefill_s": median_s(prefill, 3),
            "ttft_s": res.time_to_first_token_s,
            "decode_tok_s": res.decode_tokens_per_s,
            "generate_s": total,
            "compile_s": first_call - total,
        }
    return out


def compile_child(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds to compile the prefill forward at 2 and 64 layers (from shapes only)."""
    import jax
    import jax.numpy as jnp

    from grok.kernels import select
    from grok.model import forward_fns
    from grok.rope import rope_table
    from grok.testing import param_shapes

    config = resolve(args.shape)
    dtype = jnp.dtype(weights_of(args.dtype)[0])
    kernels = select(dtype, devices=jax.devices()[:1])  # compiled for the first device
    out = {}
    for layers in (2, 64):
        c = config.replace(num_hidden_layers=layers)
        fns = forward_fns(c, dtype, kernels=kernels)
        tokens = jax.ShapeDtypeStruct((1, args.T), jnp.int32)
        lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
        params = param_shapes(c, dtype)
        start = time.perf_counter()
        jax.jit(fns.apply).lower(
            params, tokens, tokens, rope_table(c, args.T), None, lengths
        ).compile()
        out[f"compile_s_{layers}_layers"] = time.perf_counter() - start
    out["ratio_64_over_2"] = out["compile_s_64_layers"] / out["compile_s_2_layers"]
    return out


def long_child(args: argparse.Namespace) -> dict[str, Any]:
    """One prefill of ``--long-prompt`` tokens, then ``--long-decode`` greedy tokens after it
    (the decode against a long cache); the process's peak resident memory."""
    import resource

    config = resolve(args.shape)
    config = config.replace(
        max_position_embeddings=max(
            config.max_position_embeddings, args.long_prompt + 1 + args.long_decode
        )
    )
    model = bench_model(config, args.dtype)
    rows = np.random.default_rng(0).integers(0, config.vocab_size, (1, args.long_prompt))
    res = model.generate(rows.tolist(), max_new_tokens=1 + args.long_decode)
    out = {
        "tokens": args.long_prompt,
        "ttft_s": res.time_to_first_token_s,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if args.long_decode:  # the first call includes compiling: time a second one
        res = model.generate(rows.tolist(), max_new_tokens=1 + args.long_decode)
        out["ttft_s_compiled"] = res.time_to_first_token_s
        out["decode_ms_per_token"] = 1e3 / res.decode_tokens_per_s
    return out
