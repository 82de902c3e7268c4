"""Benchmark: prefill, time to first token, decode rate, memory and compile time, against the
machine's own rooflines and (when ``torch`` and ``transformers`` are installed) against Hugging
Face ``MixtralForCausalLM`` of the same shape.

    python scripts/benchmark.py --config bench-grok1 --dtype float32 --json out.json
    python scripts/benchmark.py --config bench --long-prompt 32768 --compile-ratio

Glossary: B batch, T prompt tokens, N new tokens, D model width, V vocab, L layers,
E experts, k experts per token, Fe expert width, M = B * T tokens, A = M * k assignments.

Figures are medians over ``--repeats`` runs after a warm-up. Decode tokens per second count
every sequence of the batch; the decode roofline is the measured memory-read bandwidth divided
by the bytes of the parameters one token reads (embedding row, attention, norms, router, dense
MLP, k experts, head); the prefill roofline is the prefill's matmul FLOPs divided by the
measured matmul rate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from grok.api import Model  # noqa: E402
from grok.config import GrokConfig, get_preset, load_config  # noqa: E402
from grok.errors import ConfigError  # noqa: E402
from grok.generate import generate  # noqa: E402
from grok.layers import activation  # noqa: E402
from grok.model import forward_fns, init_params  # noqa: E402
from grok.moe import moe_blocks, route  # noqa: E402
from grok.rope import rope_table  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BANDWIDTH_BYTES = 256 * 2**20  # read-bandwidth probe: well past any CPU cache
MATMUL_SIZE = 1024  # matmul-rate probe: [1024, 1024] x [1024, 1024]


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` (its result blocked on) over ``repeats`` runs."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports kibibytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_any_config(name_or_path: str) -> GrokConfig:
    """A preset name, a checkpoint directory or a config.json path."""
    if os.path.isdir(name_or_path):
        return load_config(name_or_path)
    if os.path.isfile(name_or_path):
        return load_config(os.path.dirname(os.path.abspath(name_or_path)))
    return get_preset(name_or_path)


# Machine rooflines.


def memory_bandwidth(repeats: int) -> float:
    """Bytes per second of a jitted sum over a 256 MiB float32 array (a pure streaming read)."""
    x = jnp.ones((BANDWIDTH_BYTES // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    return BANDWIDTH_BYTES / median_time(lambda: total(x), repeats)


def matmul_rate(dtype: jnp.dtype, repeats: int) -> float:
    """FLOP per second of a jitted [n, n] x [n, n] matmul in ``dtype``."""
    n = MATMUL_SIZE
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    mm = jax.jit(jnp.dot)
    return 2 * n**3 / median_time(lambda: mm(a, b), repeats)


# Parameter and FLOP counts.


def active_param_bytes(config: GrokConfig, dtype: jnp.dtype) -> int:
    """Bytes of the parameters one decoded token reads (router float32, the rest ``dtype``)."""
    c = config
    d, h = c.hidden_size, c.head_dim
    item = jnp.dtype(dtype).itemsize
    attn = d * h * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    dense = 3 * d * c.intermediate_size if c.has_dense_mlp else 0
    experts = c.num_experts_per_tok * 3 * d * c.moe_intermediate_size
    norms = 4 * d
    per_layer = (attn + dense + experts + norms) * item + d * c.num_local_experts * 4
    head = c.vocab_size * d + d  # the head (tied or not) and the final norm
    return c.num_hidden_layers * per_layer + (head + d) * item  # + one embedding row


def matmul_flops_per_token(config: GrokConfig) -> int:
    """Matmul FLOPs per token, attention scores excluded: 2 x active matmul parameters."""
    c = config
    d, h = c.hidden_size, c.head_dim
    attn = d * h * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    dense = 3 * d * c.intermediate_size if c.has_dense_mlp else 0
    experts = c.num_experts_per_tok * 3 * d * c.moe_intermediate_size
    router = d * c.num_local_experts
    return 2 * (c.num_hidden_layers * (attn + dense + experts + router) + c.vocab_size * d)


def prefill_flops(config: GrokConfig, batch: int, prompt: int) -> int:
    """Matmul FLOPs of a causal prefill: projections, experts, head and the causal half of
    the score and value matmuls."""
    c = config
    scores = 2 * 2 * c.num_attention_heads * c.head_dim * prompt * (prompt + 1) // 2
    return batch * (prompt * matmul_flops_per_token(c) + c.num_hidden_layers * scores)


# The library.


def bench_grok(
    config: GrokConfig, dtype: jnp.dtype, args: argparse.Namespace
) -> tuple[dict, np.ndarray]:
    """Prefill, TTFT, decode at each batch size, compile time; returns (figures, greedy tokens
    of row 0 at batch 1)."""
    model = Model(config, init_params(config, seed=0, dtype=dtype), dtype=dtype)
    rng = np.random.default_rng(0)
    out: dict = {}
    prompts = rng.integers(0, config.vocab_size, (max(args.batch), args.prompt_len))

    tokens = jnp.asarray(prompts[:1], jnp.int32)  # [1, T]
    start = time.perf_counter()
    jax.block_until_ready(model.logits(tokens))
    out["prefill_compile_s"] = time.perf_counter() - start
    out["prefill_s"] = median_time(lambda: model.logits(tokens), args.repeats, warmup=0)

    greedy = None
    for b in args.batch:
        rows = prompts[:b].tolist()
        start = time.perf_counter()
        first = generate(model, rows, max_new_tokens=args.new_tokens)
        out[f"generate_first_call_s_b{b}"] = time.perf_counter() - start
        ttft, rate = [], []
        for _ in range(args.repeats):
            res = generate(model, rows, max_new_tokens=args.new_tokens)
            ttft.append(res.time_to_first_token_s)
            rate.append(res.decode_tokens_per_s)
        out[f"ttft_s_b{b}"] = float(np.median(ttft))
        out[f"decode_tok_s_b{b}"] = float(np.median(rate))
        out[f"decode_tok_s_b{b}_min_max"] = [float(min(rate)), float(max(rate))]
        if b == 1:
            greedy = np.asarray(first.tokens[0])
            out["compile_s"] = out["generate_first_call_s_b1"] - (
                out["ttft_s_b1"] + args.new_tokens / out["decode_tok_s_b1"]
            )
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out, greedy


def compile_seconds(config: GrokConfig, dtype: jnp.dtype, prompt: int) -> float:
    """Seconds to lower and compile the prefill forward, from shapes only (no parameters)."""
    fns = forward_fns(config, jnp.dtype(dtype))
    rope = rope_table(config, 2 * prompt)
    tokens = jax.ShapeDtypeStruct((1, prompt), jnp.int32)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    params = jax.eval_shape(lambda: init_params(config, seed=0, dtype=dtype))
    start = time.perf_counter()
    jax.jit(fns.apply).lower(params, tokens, tokens, rope, None, lengths).compile()
    return time.perf_counter() - start


def bench_moe_layer(config: GrokConfig, dtype: jnp.dtype, prompt: int, repeats: int) -> dict:
    """One MoE layer on a T-token prefill: the block path vs the same matmuls on only the
    active tokens-times-experts (each expert's tokens gathered beforehand, exact sizes)."""
    c = config
    d, fe, e, k = c.hidden_size, c.moe_intermediate_size, c.num_local_experts, c.num_experts_per_tok
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(prompt, d)), dtype)  # [M, D]
    w1 = jnp.asarray(rng.normal(size=(e, d, fe)) * d**-0.5, dtype)  # [E, D, Fe]
    w3 = jnp.asarray(rng.normal(size=(e, d, fe)) * d**-0.5, dtype)
    w2 = jnp.asarray(rng.normal(size=(e, fe, d)) * fe**-0.5, dtype)  # [E, Fe, D]
    w_gate = jnp.asarray(rng.normal(size=(d, e)), jnp.float32)  # [D, E]
    act = activation(c.hidden_act)

    def layer(x, w_gate, w1, w3, w2):
        weights, experts, _ = route(x, w_gate, cap=c.router_logit_softcapping, k=k)
        return moe_blocks(x, weights, experts, w1, w3, w2, act)

    layer_j = jax.jit(layer)
    t_layer = median_time(lambda: layer_j(x, w_gate, w1, w3, w2), repeats)

    _, experts, _ = route(x, w_gate, cap=c.router_logit_softcapping, k=k)
    sizes = np.bincount(np.asarray(experts).reshape(-1), minlength=e)  # [E]
    xs = [jnp.asarray(rng.normal(size=(int(n), d)), dtype) for n in sizes]  # [n_e, D] each

    def active_only(xs, w1, w3, w2):
        return [
            jnp.dot(act(jnp.dot(xe, w1[i])) * jnp.dot(xe, w3[i]), w2[i])
            for i, xe in enumerate(xs)
            if xe.shape[0]
        ]

    base_j = jax.jit(active_only)
    t_base = median_time(lambda: base_j(xs, w1, w3, w2), repeats)
    return {
        "moe_layer_prefill_s": t_layer,
        "moe_active_matmuls_s": t_base,
        "moe_ratio": t_layer / t_base,
        "moe_group_sizes": sizes.tolist(),
        "moe_active_flops": int(2 * 3 * d * fe * prompt * k),
    }


def long_prompt_child(config_name: str, dtype_name: str, prompt: int) -> None:
    """Runs in a fresh process: one prefill of ``prompt`` tokens, prints peak memory as JSON."""
    config = load_any_config(config_name)
    dtype = DTYPES[dtype_name]
    model = Model(config, init_params(config, seed=0, dtype=dtype), dtype=dtype)
    rows = np.random.default_rng(0).integers(0, config.vocab_size, (1, prompt)).tolist()
    start = time.perf_counter()
    res = generate(model, rows, max_new_tokens=1)
    print(
        json.dumps(
            {
                "long_prompt_tokens": prompt,
                "long_prompt_peak_rss_bytes": peak_rss_bytes(),
                "long_prompt_ttft_s": res.time_to_first_token_s,
                "long_prompt_wall_s": time.perf_counter() - start,
            }
        )
    )


# Hugging Face Mixtral.


def bench_mixtral(config: GrokConfig, dtype_name: str, args: argparse.Namespace) -> dict | None:
    """``MixtralForCausalLM`` of the same shape, random weights, greedy ``generate``."""
    try:
        import torch
        from transformers import MixtralConfig, MixtralForCausalLM
    except ImportError:
        return None
    c = config
    hf = MixtralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.moe_intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        num_local_experts=c.num_local_experts,
        num_experts_per_tok=c.num_experts_per_tok,
        max_position_embeddings=max(4096, args.prompt_len + args.new_tokens),
        tie_word_embeddings=c.tie_word_embeddings,
        rope_theta=c.rope_theta,
    )
    torch.manual_seed(0)
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    model = MixtralForCausalLM(hf).to(tdtype).eval()
    rng = np.random.default_rng(0)
    prompts = torch.as_tensor(rng.integers(0, c.vocab_size, (max(args.batch), args.prompt_len)))
    out: dict = {"torch_threads": torch.get_num_threads()}

    def gen(ids, n):
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )

    with torch.inference_mode():
        ids = prompts[:1]
        out["prefill_s"] = median_time(lambda: model(ids, use_cache=True).logits, args.repeats)
        for b in args.batch:
            ids = prompts[:b]
            ttft = median_time(lambda ids=ids: gen(ids, 1), args.repeats)
            full = []
            gen(ids, args.new_tokens)
            for _ in range(args.repeats):
                start = time.perf_counter()
                gen(ids, args.new_tokens)
                full.append(time.perf_counter() - start)
            decode = float(np.median(full)) - ttft
            out[f"ttft_s_b{b}"] = ttft
            out[f"decode_tok_s_b{b}"] = b * (args.new_tokens - 1) / decode
        out["greedy"] = gen(prompts[:1], args.new_tokens)[0, args.prompt_len :].tolist()
    return out


# Report.


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="bench-grok1", help="preset name or config path")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile-ratio", action="store_true", help="64-layer vs 2-layer compile")
    p.add_argument("--long-prompt", type=int, default=0, help="prefill peak memory check")
    p.add_argument("--no-mixtral", action="store_true")
    p.add_argument("--json", default="benchmark.json")
    p.add_argument("--long-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.long_child:
        long_prompt_child(args.config, args.dtype, args.long_prompt)
        return
    if 1 not in args.batch:
        raise ConfigError(f"--batch must include 1 (the roofline figures use it), got {args.batch}")

    config = load_any_config(args.config)
    dtype = DTYPES[args.dtype]
    res: dict = {
        "config": args.config,
        "dtype": args.dtype,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "load_avg_start": os.getloadavg()[0],
    }
    res["bandwidth_B_s"] = memory_bandwidth(args.repeats)
    res["matmul_flop_s"] = matmul_rate(dtype, args.repeats)
    grok, greedy = bench_grok(config, dtype, args)
    res["grok"] = grok
    res["active_param_bytes_per_token"] = active_param_bytes(config, dtype)
    roofline = res["bandwidth_B_s"] / res["active_param_bytes_per_token"]
    res["decode_roofline_tok_s"] = roofline
    res["decode_fraction_of_roofline"] = grok["decode_tok_s_b1"] / roofline
    flops = prefill_flops(config, 1, args.prompt_len)
    res["prefill_flops"] = flops
    res["prefill_fraction_of_roofline"] = flops / res["matmul_flop_s"] / grok["prefill_s"]
    res["batch8_over_batch1"] = grok.get("decode_tok_s_b8", 0.0) / grok["decode_tok_s_b1"]
    res.update(bench_moe_layer(config, dtype, args.prompt_len, args.repeats))
    res["moe_active_flop_bound_s"] = res["moe_active_flops"] / res["matmul_flop_s"]
    if args.compile_ratio:
        c64 = compile_seconds(config.replace(num_hidden_layers=64), dtype, args.prompt_len)
        c2 = compile_seconds(config.replace(num_hidden_layers=2), dtype, args.prompt_len)
        res["compile_s_64_layers"], res["compile_s_2_layers"] = c64, c2
        res["compile_ratio_64_over_2"] = c64 / c2
    if args.long_prompt:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--long-child",
            "--config",
            args.config,
            "--dtype",
            args.dtype,
            "--long-prompt",
            str(args.long_prompt),
        ]
        child = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if child.returncode == 0:
            res.update(json.loads(child.stdout.strip().splitlines()[-1]))
        else:
            res["long_prompt_error"] = child.stderr[-2000:]
    if not args.no_mixtral and config.has_dense_mlp:
        res["mixtral"] = "skipped: Mixtral has no dense MLP; compare with bench-grok1"
    elif not args.no_mixtral:
        mix = bench_mixtral(config, args.dtype, args)
        if mix is None:
            res["mixtral"] = "skipped: torch/transformers not installed (pip install .[bench])"
        else:
            mix_greedy = mix.pop("greedy")
            res["mixtral"] = mix
            res["ratios_vs_mixtral"] = {
                key: (
                    mix[key] / grok[key]
                    if key.startswith(("prefill", "ttft"))
                    else grok[key] / mix[key]
                )
                for key in (
                    "prefill_s",
                    *(f"ttft_s_b{b}" for b in args.batch),
                    *(f"decode_tok_s_b{b}" for b in args.batch),
                )
            }
            res["mixtral_greedy_len"] = len(mix_greedy)
            res["grok_greedy_len"] = int(len(greedy))
    res["load_avg_end"] = os.getloadavg()[0]
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)
    print_table(res)


def print_table(res: dict) -> None:
    """The headline figures as a two-column table."""
    g = res["grok"]
    rows = [
        ("machine read bandwidth", f"{res['bandwidth_B_s'] / 1e9:.2f} GB/s"),
        ("machine matmul rate", f"{res['matmul_flop_s'] / 1e9:.1f} GFLOP/s"),
        ("prefill (B=1)", f"{g['prefill_s'] * 1e3:.1f} ms"),
        ("prefill / matmul roofline", f"{res['prefill_fraction_of_roofline']:.1%}"),
    ]
    for key in sorted(g):
        if key.startswith(("ttft", "decode_tok_s")) and not key.endswith("min_max"):
            unit = " s" if key.startswith("ttft") else " tok/s"
            rows.append((key, f"{g[key]:.4g}{unit}"))
    rows += [
        ("decode roofline (B=1)", f"{res['decode_roofline_tok_s']:.1f} tok/s"),
        ("decode / bandwidth roofline", f"{res['decode_fraction_of_roofline']:.1%}"),
        ("batch 8 / batch 1 decode", f"{res['batch8_over_batch1']:.2f}x"),
        ("compile (generate, B=1)", f"{g['compile_s']:.2f} s"),
        ("peak host memory", f"{g['peak_rss_bytes'] / 2**30:.2f} GiB"),
        ("MoE layer prefill", f"{res['moe_layer_prefill_s'] * 1e3:.2f} ms"),
        ("MoE same matmuls, active only", f"{res['moe_active_matmuls_s'] * 1e3:.2f} ms"),
        ("MoE active FLOPs / matmul rate", f"{res['moe_active_flop_bound_s'] * 1e3:.2f} ms"),
    ]
    if "compile_ratio_64_over_2" in res:
        rows.append(
            (
                "compile 64 / 2 layers",
                f"{res['compile_ratio_64_over_2']:.2f}x "
                f"({res['compile_s_64_layers']:.1f} / {res['compile_s_2_layers']:.1f} s)",
            )
        )
    if "long_prompt_peak_rss_bytes" in res:
        rows.append(
            (
                f"{res['long_prompt_tokens']}-token prefill peak memory",
                f"{res['long_prompt_peak_rss_bytes'] / 2**30:.2f} GiB",
            )
        )
    for key, value in res.get("ratios_vs_mixtral", {}).items():
        rows.append((f"vs Mixtral: {key}", f"{value:.2f}x (>1 = grok better)"))
    if isinstance(res.get("mixtral"), str):
        rows.append(("Mixtral", res["mixtral"]))
    width = max(len(r[0]) for r in rows)
    print(
        f"{res['config']} {res['dtype']}  T={res['prompt_len']} N={res['new_tokens']}  "
        f"medians of {res['repeats']}; load {res['load_avg_start']:.1f} -> "
        f"{res['load_avg_end']:.1f} on {res['cpu_count']} cores"
    )
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    main()
