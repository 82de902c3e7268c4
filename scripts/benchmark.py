"""Benchmark: grok against Hugging Face ``MixtralForCausalLM`` of the same shape, fairly.

    python scripts/benchmark.py                         # the full comparison (8-10 minutes)
    python scripts/benchmark.py --dtype float32 --repeats 1 --no-full-width   # a quick look
    python scripts/benchmark.py --compile-ratio --long-prompt 32768 --no-mixtral

Glossary: B batch, T prompt tokens, N new tokens, D model width, L layers.

How it is fair:

- Every measurement runs in its own fresh subprocess (``--child ENGINE``): JAX and torch never
  share a process, and nothing one engine leaves behind (threads, caches, memory) slows the
  other. The parent imports neither.
- Both engines get the same shape (``--shape``, default ``bench-grok1``: see
  ``bench_shapes.py``), dtype, random prompts (T tokens, seed 0), N new tokens, greedy
  decoding, random weights, and the same CPUs: each child pins itself to ``--threads`` CPUs
  (``sched_setaffinity``) and sets torch's and OpenMP's thread counts to the same number.
- The engines alternate over ``--repeats`` (grok, Mixtral, Mixtral, grok, ...); each child
  compiles / warms up first, then measures. The report gives the median over repeats and the
  spread (min, max).
- A ratio is printed only when the run is sane: batch 8 decodes at least as many tokens per
  second in total as batch 1, the time to first token is shorter than the whole generation,
  and the machine's 1-minute load (``os.getloadavg``) stayed at or below its core count for
  every child. Otherwise the ratio is replaced by the reason.

Figures per engine, dtype and batch: prefill of the T-token prompt into a KV cache (head at the
last position only), time to first token, decode tokens per
second over the batch (N - 1 steps after the first token; both from one ``generate`` call:
grok's ``GenerationResult``, and for Mixtral a streamer that notes the time of each token), and
for grok the compile time (first call minus a compiled one).

``--full-width`` (on by default) adds one Grok-2 decoder layer at full width
(``full-width-layer``), bf16 decode at batch 1, as a fraction of the memory-bandwidth roofline:
the bytes of the weights one token reads (attention, dense MLP, k experts, norms, router, head)
over the machine's read bandwidth (a jitted sum over a 1 GiB array, which is past any cache).
Its weights take 8.4 GB at E = 8; ``--full-width-experts 2`` keeps the bytes one token reads and
needs 3.5 GB.

Everything is written to ``--json`` (the README's table is made from it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ENGINES = ("grok", "mixtral")
DTYPES = ("float32", "bfloat16")
BANDWIDTH_BYTES = 2**30  # read-bandwidth probe: far past the CPU's caches
# The children themselves keep --threads threads busy back to back, so the 1-minute load sits
# near the thread count on an otherwise idle machine (2.0-2.2 measured for 2 threads on 2
# cores); a load above the cores plus half a thread means someone else was running.
LOAD_SLACK = 0.5


def _pin_threads(threads: int) -> None:
    """Restricts this process to ``threads`` CPUs and tells OpenMP/MKL the same number."""
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


def _median_s(fn, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


# Children: each runs in a fresh process and prints one JSON line.


def random_params(config, dtype, seed: int = 0):
    """Random weights of the model's shapes, made on the device by one cheap elementwise hash
    per leaf (no RNG state, no float32 temporaries: a full-width layer is 8.4 GB in bf16).

    Matrices get values of standard deviation 0.02 (Hugging Face's ``initializer_range``, as
    Mixtral's own init), norms 1, the router standard deviation 1 / sqrt(D).
    """
    import jax
    import jax.numpy as jnp

    from grok.model import init_params

    shapes = jax.eval_shape(lambda: init_params(config, seed, dtype))

    def fill(shape, dtype, salt, std):
        i = jax.lax.iota(jnp.uint32, int(np.prod(shape))).reshape(shape)
        h = i * jnp.uint32(2654435761) + jnp.uint32(salt)  # Knuth's multiplicative hash
        h = (h ^ (h >> 15)) * jnp.uint32(2246822519)
        h = h ^ (h >> 13)
        u = (h >> 8).astype(jnp.float32) * (2.0**-24) - 0.5  # uniform in [-0.5, 0.5)
        return (u * (std * 12**0.5)).astype(dtype)  # a uniform of standard deviation std

    fill_j = jax.jit(fill, static_argnums=(0, 1, 3))
    out = {}
    for n, (module, leaves) in enumerate(sorted(shapes.items())):
        out[module] = {}
        for m, (name, s) in enumerate(sorted(leaves.items())):
            if "norm" in module:
                out[module][name] = jnp.ones(s.shape, s.dtype)
                continue
            std = config.hidden_size**-0.5 if "router" in name else 0.02
            out[module][name] = fill_j(s.shape, s.dtype, 7919 * (n * 64 + m) + seed, std)
    return out


def grok_child(args: argparse.Namespace) -> dict:
    """grok: prefill, time to first token, decode and compile time at each batch size."""
    import jax
    import jax.numpy as jnp
    from bench_shapes import resolve

    from grok.api import Model
    from grok.generate import generate
    from grok.kv_cache import KVCache

    config = resolve(args.shape)
    dtype = jnp.dtype(args.dtype)
    model = Model(config, random_params(config, dtype), dtype=dtype)
    prompts = np.random.default_rng(0).integers(0, config.vocab_size, (max(args.batch), args.T))
    out: dict = {"jax": jax.__version__, "device": jax.devices()[0].device_kind}
    for b in args.batch:
        rows = prompts[:b].tolist()
        tokens = jnp.asarray(prompts[:b], jnp.int32)  # [B, T]
        positions = jnp.broadcast_to(jnp.arange(args.T, dtype=jnp.int32), (b, args.T))
        lengths = jnp.full((b,), args.T, jnp.int32)
        cache = KVCache.create(config, b, args.T, dtype)

        def prefill(tokens=tokens, positions=positions, lengths=lengths, cache=cache):
            logits, new_cache = model.apply(tokens, positions, cache, lengths, lengths - 1)
            jax.block_until_ready((logits, new_cache))

        start = time.perf_counter()
        generate(model, rows, max_new_tokens=args.N)  # compiles prefill and decode
        first_call = time.perf_counter() - start
        res = generate(model, rows, max_new_tokens=args.N)
        total = res.time_to_first_token_s + res.decode_time_s
        out[f"b{b}"] = {
            "prefill_s": _median_s(prefill, 3),
            "ttft_s": res.time_to_first_token_s,
            "decode_tok_s": res.decode_tokens_per_s,
            "generate_s": total,
            "compile_s": first_call - total,
        }
    return out


def mixtral_child(args: argparse.Namespace) -> dict:
    """Hugging Face ``MixtralForCausalLM`` of the same shape, greedy ``generate``."""
    import torch
    import transformers
    from bench_shapes import resolve
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from grok.errors import ConfigError

    torch.set_num_threads(args.threads)
    c = resolve(args.shape)
    if c.has_dense_mlp:
        raise ConfigError(
            f"{args.shape} has a dense MLP beside the experts, which Mixtral cannot express: "
            "compare on bench-grok1, or pass --no-mixtral"
        )
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
        max_position_embeddings=max(4096, args.T + args.N),
        tie_word_embeddings=c.tie_word_embeddings,
        rope_theta=c.rope_theta,
    )
    torch.manual_seed(0)
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = MixtralForCausalLM(hf).to(tdtype).eval()
    prompts = np.random.default_rng(0).integers(0, c.vocab_size, (max(args.batch), args.T))
    out: dict = {
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
            ttft = times[2] - times[0]
            out[f"b{b}"] = {
                "prefill_s": _median_s(
                    lambda ids=ids: model(ids, use_cache=True, logits_to_keep=1).logits, 3
                ),
                "ttft_s": ttft,
                "decode_tok_s": b * (args.N - 1) / (times[-1] - times[2]),
                "generate_s": times[-1] - times[0],
            }
    return out


def bandwidth_child(args: argparse.Namespace) -> dict:
    """One full-width Grok-2 layer: bf16 decode at batch 1 against the bandwidth roofline."""
    import jax.numpy as jnp
    from bench_shapes import resolve

    from grok.api import Model
    from grok.generate import generate

    config = resolve("full-width-layer").replace(num_local_experts=args.full_width_experts)
    dtype = jnp.dtype("bfloat16")
    model = Model(config, random_params(config, dtype), dtype=dtype)
    rows = np.random.default_rng(0).integers(0, config.vocab_size, (1, 16)).tolist()
    generate(model, rows, max_new_tokens=args.full_width_tokens)  # compiles
    per_token = active_param_bytes(config, 2)
    # The probe runs right before each decode: this VM's read bandwidth moved between 43 and
    # 75 GB/s over minutes, so a probe taken once set some runs' roofline from another phase.
    bandwidths, rates = [], []
    for _ in range(3):
        bandwidths.append(read_bandwidth())
        rates.append(
            generate(model, rows, max_new_tokens=args.full_width_tokens).decode_tokens_per_s
        )
    fractions = [r * per_token / b for r, b in zip(rates, bandwidths, strict=True)]
    pick = int(np.argsort(fractions)[1])  # the pair with the median fraction
    return {
        "experts_in_memory": args.full_width_experts,
        "read_bandwidth_B_s": bandwidths[pick],
        "read_bandwidth_B_s_all": bandwidths,
        "bytes_per_token": per_token,
        "roofline_tok_s": bandwidths[pick] / per_token,
        "decode_tok_s": rates[pick],
        "decode_tok_s_all": rates,
        "fraction_of_roofline": fractions[pick],
        "fraction_of_roofline_all": fractions,
    }


def read_bandwidth() -> float:
    """Bytes per second of the fastest of several streaming reads of a 1 GiB float32 array:
    XLA's sum over it whole and over two halves (one per core), and, where the native kernels
    exist, a one-row matrix-vector product over it. The best read found is the roofline's
    bandwidth, so a decode step cannot come out above it by reading better than the probe
    (the native product read at 45-50 GB/s where XLA's sums read at 35-41 GB/s here)."""
    import jax
    import jax.numpy as jnp

    from grok.kernels import cpu

    x = jnp.ones((BANDWIDTH_BYTES // 4,), jnp.float32)
    reads = [jax.jit(jnp.sum), jax.jit(lambda x: jnp.sum(x.reshape(2, -1), axis=1))]
    if cpu.available(jnp.float32):
        matrix = x.reshape(-1, 4096)  # [O, I]: one product reads every byte once
        row = jnp.ones((1, 4096), jnp.float32)
        reads.append(lambda x: cpu.matvec(row, matrix))
    return max(
        BANDWIDTH_BYTES / _median_s(lambda f=f: jax.block_until_ready(f(x)), 5) for f in reads
    )


def active_param_bytes(config, itemsize: int) -> int:
    """Bytes of the weights one decoded token reads: attention, dense MLP, k experts and
    norms in ``itemsize`` bytes, the router in float32, one embedding row, the head."""
    c = config
    d, h = c.hidden_size, c.head_dim
    attn = d * h * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    dense = 3 * d * c.intermediate_size if c.has_dense_mlp else 0
    experts = c.num_experts_per_tok * 3 * d * c.moe_intermediate_size
    per_layer = (attn + dense + experts + 4 * d) * itemsize + d * c.num_local_experts * 4
    head = (c.vocab_size * d + d) * itemsize  # the head (tied or not) and the final norm
    return c.num_hidden_layers * per_layer + head + d * itemsize


def compile_child(args: argparse.Namespace) -> dict:
    """Seconds to compile the prefill forward at 2 and 64 layers (from shapes only)."""
    import jax
    import jax.numpy as jnp
    from bench_shapes import resolve

    from grok.kernels import select
    from grok.model import forward_fns, init_params
    from grok.rope import rope_table

    config = resolve(args.shape)
    dtype = jnp.dtype(args.dtype)
    kernels = select(dtype, devices=jax.devices()[:1])  # compiled for the first device
    out = {}
    for layers in (2, 64):
        c = config.replace(num_hidden_layers=layers)
        fns = forward_fns(c, dtype, kernels=kernels)
        tokens = jax.ShapeDtypeStruct((1, args.T), jnp.int32)
        lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
        params = jax.eval_shape(lambda c=c: init_params(c, 0, dtype))
        start = time.perf_counter()
        jax.jit(fns.apply).lower(
            params, tokens, tokens, rope_table(c, args.T), None, lengths
        ).compile()
        out[f"compile_s_{layers}_layers"] = time.perf_counter() - start
    out["ratio_64_over_2"] = out["compile_s_64_layers"] / out["compile_s_2_layers"]
    return out


def long_child(args: argparse.Namespace) -> dict:
    """One prefill of ``--long-prompt`` tokens, then ``--long-decode`` greedy tokens after it
    (the decode against a long cache); the process's peak resident memory."""
    import resource

    import jax.numpy as jnp
    from bench_shapes import resolve

    from grok.api import Model
    from grok.generate import generate

    config = resolve(args.shape)
    config = config.replace(
        max_position_embeddings=max(
            config.max_position_embeddings, args.long_prompt + 1 + args.long_decode
        )
    )
    dtype = jnp.dtype(args.dtype)
    model = Model(config, random_params(config, dtype), dtype=dtype)
    rows = np.random.default_rng(0).integers(0, config.vocab_size, (1, args.long_prompt))
    res = generate(model, rows.tolist(), max_new_tokens=1 + args.long_decode)
    out = {
        "tokens": args.long_prompt,
        "ttft_s": res.time_to_first_token_s,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if args.long_decode:  # the first call includes compiling: time a second one
        res = generate(model, rows.tolist(), max_new_tokens=1 + args.long_decode)
        out["ttft_s_compiled"] = res.time_to_first_token_s
        out["decode_ms_per_token"] = 1e3 / res.decode_tokens_per_s
    return out


CHILDREN = {
    "grok": grok_child,
    "mixtral": mixtral_child,
    "bandwidth": bandwidth_child,
    "compile": compile_child,
    "long": long_child,
}


# The parent: runs the children, checks, reports.


def run_child(kind: str, dtype: str, args: argparse.Namespace) -> dict:
    """Runs one child in a fresh process; its figures plus the load around it (or an error)."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        kind,
        "--dtype",
        dtype,
        "--shape",
        args.shape,
        "--threads",
        str(args.threads),
        "--prompt-len",
        str(args.T),
        "--new-tokens",
        str(args.N),
        "--batch",
        *map(str, args.batch),
        "--full-width-experts",
        str(args.full_width_experts),
        "--full-width-tokens",
        str(args.full_width_tokens),
        "--long-prompt",
        str(args.long_prompt),
        "--long-decode",
        str(args.long_decode),
    ]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    )
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    child = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()[0]
    if child.returncode != 0:
        figures = {"error": child.stderr.strip()[-2000:]}
    else:
        figures = json.loads(child.stdout.strip().splitlines()[-1])
    figures.update(load_before=load_before, load_after=load_after, wall_s=wall)
    print(
        f"  {kind:<9} {dtype:<8} {wall:6.1f} s  load {load_before:.1f} -> {load_after:.1f}"
        + ("  FAILED" if "error" in figures else ""),
        flush=True,
    )
    return figures


def summarise(runs: list[dict], batch: list[int]) -> dict:
    """Median and (min, max) of each figure over the repeats."""
    out: dict = {}
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0].get("error", "no run")}
    for b in batch:
        key = f"b{b}"
        out[key] = {}
        for name in ok[0][key]:
            values = [r[key][name] for r in ok]
            out[key][name] = {
                "median": float(np.median(values)),
                "min": float(min(values)),
                "max": float(max(values)),
            }
    return out


def sanity(summary: dict, runs: list[dict], batch: list[int], cores: int) -> list[str]:
    """Reasons the figures of one engine cannot be trusted (empty when they can)."""
    problems = []
    if "error" in summary:
        return [f"a run failed: {summary['error'][-300:]}"]
    med = {b: {k: v["median"] for k, v in summary[f"b{b}"].items()} for b in batch}
    lo, hi = min(batch), max(batch)
    if hi > lo and med[hi]["decode_tok_s"] < med[lo]["decode_tok_s"]:
        problems.append(
            f"batch {hi} decodes fewer tokens/s in total ({med[hi]['decode_tok_s']:.1f}) than "
            f"batch {lo} ({med[lo]['decode_tok_s']:.1f})"
        )
    for b in batch:
        if med[b]["ttft_s"] >= med[b]["generate_s"]:
            problems.append(
                f"batch {b}: time to first token {med[b]['ttft_s']:.3f} s is not shorter than "
                f"the whole generation {med[b]['generate_s']:.3f} s"
            )
    loads = [max(r["load_before"], r["load_after"]) for r in runs]
    if max(loads) > cores + LOAD_SLACK:
        problems.append(
            f"machine load reached {max(loads):.1f} on {cores} cores (more than "
            f"{cores} + {LOAD_SLACK})"
        )
    return problems


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="bench-grok1", help="bench shape, preset or config path")
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--prompt-len", dest="T", type=int, default=128)
    p.add_argument("--new-tokens", dest="N", type=int, default=128)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per engine")
    p.add_argument("--threads", type=int, default=2, help="CPUs (and threads) per engine")
    p.add_argument("--no-mixtral", action="store_true")
    p.add_argument("--no-full-width", action="store_true")
    p.add_argument("--full-width-experts", type=int, default=8)
    p.add_argument("--full-width-tokens", type=int, default=8)
    p.add_argument("--compile-ratio", action="store_true", help="compile time, 64 vs 2 layers")
    p.add_argument("--long-prompt", type=int, default=0, help="peak memory of this prefill")
    p.add_argument(
        "--long-decode", type=int, default=0, help="new tokens timed after --long-prompt"
    )
    p.add_argument("--json", default="benchmark.json")
    p.add_argument("--report", help="re-check and print a saved --json file instead of running")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _pin_threads(args.threads)
        args.dtype = args.dtype[0]
        print(json.dumps(CHILDREN[args.child](args)))
        return

    if args.report:
        with open(args.report) as f:
            res = json.load(f)
        args.dtype = [d for d in DTYPES if any(k.endswith(d) for k in res["summary"])]
        args.batch = res["batch"]
        evaluate(res, args)
        print_report(res, args)
        return
    cores = os.cpu_count() or 1
    engines = ["grok"] if args.no_mixtral else list(ENGINES)
    res: dict = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "shape": args.shape,
        "prompt_len": args.T,
        "new_tokens": args.N,
        "batch": args.batch,
        "repeats": args.repeats,
        "threads": args.threads,
        "cores": cores,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_start": os.getloadavg(),
    }
    start = time.perf_counter()
    runs: dict = {e: {d: [] for d in args.dtype} for e in engines}
    for rep in range(args.repeats):
        order = engines if rep % 2 == 0 else engines[::-1]  # alternate who goes first
        print(f"repeat {rep + 1}/{args.repeats}", flush=True)
        for dtype in args.dtype:
            for engine in order:
                runs[engine][dtype].append(run_child(engine, dtype, args))
    res["runs"] = runs
    evaluate(res, args)
    if not args.no_full_width:
        res["full_width_layer"] = run_child("bandwidth", "bfloat16", args)
    if args.compile_ratio:
        res["compile"] = run_child("compile", args.dtype[0], args)
    if args.long_prompt:
        res["long_prompt"] = run_child("long", args.dtype[0], args)
    res["wall_s"] = time.perf_counter() - start
    res["load_end"] = os.getloadavg()
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)
    print_report(res, args)


def evaluate(res: dict, args: argparse.Namespace) -> None:
    """Fills res's summary (medians, spread), problems (sanity checks) and ratios."""
    res["summary"], res["problems"], res["ratios"] = {}, {}, {}
    for dtype in args.dtype:
        engines = [e for e in ENGINES if e in res["runs"]]
        for engine in engines:
            runs = res["runs"][engine][dtype]
            s = summarise(runs, args.batch)
            res["summary"][f"{engine} {dtype}"] = s
            res["problems"][f"{engine} {dtype}"] = sanity(s, runs, args.batch, res["cores"])
        if "mixtral" in engines:
            res["ratios"][dtype] = ratios(res, dtype, args.batch)


def ratios(res: dict, dtype: str, batch: list[int]) -> dict:
    """grok over Mixtral (> 1: grok is better) per figure, or the reasons there is none."""
    problems = res["problems"][f"grok {dtype}"] + res["problems"][f"mixtral {dtype}"]
    if problems:
        return {"refused": problems}
    g, m = res["summary"][f"grok {dtype}"], res["summary"][f"mixtral {dtype}"]
    out = {}
    for b in batch:
        gb, mb = g[f"b{b}"], m[f"b{b}"]
        out[f"decode b{b}"] = gb["decode_tok_s"]["median"] / mb["decode_tok_s"]["median"]
        out[f"prefill b{b}"] = mb["prefill_s"]["median"] / gb["prefill_s"]["median"]
        out[f"ttft b{b}"] = mb["ttft_s"]["median"] / gb["ttft_s"]["median"]
    return out


def _fig(stat: dict, scale: float = 1.0, fmt: str = ".1f") -> str:
    return (
        f"{stat['median'] * scale:{fmt}} ({stat['min'] * scale:{fmt}}-{stat['max'] * scale:{fmt}})"
    )


def print_report(res: dict, args: argparse.Namespace) -> None:
    """A table per dtype: each engine's medians (min-max) and the ratio."""
    load = res["load_start"]
    print(
        f"\n{res['shape']}, T={res['prompt_len']}, N={res['new_tokens']}, {res['threads']} "
        f"threads, medians (min-max) of {res['repeats']} fresh processes per engine; load "
        f"{load[0]:.1f} at start, {res['load_end'][0]:.1f} at end, {res['cores']} cores; "
        f"{res['wall_s'] / 60:.1f} min"
    )
    for dtype in args.dtype:
        print(f"\n{dtype}")
        rows = []
        for b in args.batch:
            for what, key, scale, unit, ratio_key in (
                ("decode", "decode_tok_s", 1.0, "tok/s", "decode"),
                ("prefill", "prefill_s", 1e3, "ms", "prefill"),
                ("first token", "ttft_s", 1e3, "ms", "ttft"),
            ):
                cells = []
                for engine in res["summary"]:
                    if not engine.endswith(dtype):
                        continue
                    s = res["summary"][engine]
                    cells.append("failed" if "error" in s else _fig(s[f"b{b}"][key], scale))
                r = res["ratios"].get(dtype, {})
                ratio = "" if "refused" in r or not r else f"{r[f'{ratio_key} b{b}']:.2f}x"
                rows.append((f"{what} B={b} ({unit})", *cells, ratio))
            g = res["summary"].get(f"grok {dtype}", {})
            if "error" not in g:
                rows.append((f"grok compile B={b} (s)", _fig(g[f"b{b}"]["compile_s"]), "", ""))
        header = ("figure", *[e.split()[0] for e in res["summary"] if e.endswith(dtype)], "ratio")
        width = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            print("  " + "  ".join(f"{str(c):<{w}}" for c, w in zip(r, width, strict=False)))
        for engine in ("grok", "mixtral"):
            for problem in res["problems"].get(f"{engine} {dtype}", []):
                print(f"  no ratio: {engine}: {problem}")
    fw = res.get("full_width_layer")
    if fw and "error" not in fw:
        print(
            f"\nfull-width Grok-2 layer, bf16, B=1 ({fw['experts_in_memory']} experts in memory): "
            f"{fw['decode_tok_s']:.2f} tok/s; {fw['bytes_per_token'] / 1e9:.2f} GB per token at "
            f"{fw['read_bandwidth_B_s'] / 1e9:.1f} GB/s read bandwidth = roofline "
            f"{fw['roofline_tok_s']:.2f} tok/s; {fw['fraction_of_roofline']:.0%} of it"
            + (  # each decode against the probe taken just before it (older files lack it)
                f" (each run: {', '.join(f'{f:.0%}' for f in fw['fraction_of_roofline_all'])})"
                if "fraction_of_roofline_all" in fw
                else ""
            )
        )
    elif fw:
        print(f"\nfull-width layer failed: {fw['error'][-500:]}")
    for key in ("compile", "long_prompt"):
        if key in res:
            print(f"\n{key}: " + json.dumps({k: v for k, v in res[key].items()}))


if __name__ == "__main__":
    main()
