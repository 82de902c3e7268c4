"""One full-width Grok-2 decoder layer (``full-width-layer``), bf16 decode at batch 1, as a
fraction of the memory-bandwidth roofline: the bytes of the weights one token reads
(attention, dense MLP, k experts, norms, router, head) over the machine's read bandwidth.

Its weights take 8.4 GB at E = 8 (made on the device by ``grok.testing.random_params``);
``--full-width-experts 2`` keeps the bytes one token reads and needs 3.5 GB.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from grok.bench.grok_engine import bench_model
from grok.bench.harness import median_s
from grok.bench.shapes import resolve
from grok.config import GrokConfig

BANDWIDTH_BYTES = 2**30  # read-bandwidth probe: far past the CPU's caches


def bandwidth_child(args: argparse.Namespace) -> dict[str, Any]:
    """The full-width layer's decode rate against the read bandwidth probed before each."""
    config = resolve("full-width-layer").replace(num_local_experts=args.full_width_experts)
    model = bench_model(config, "bfloat16")
    rows = np.random.default_rng(0).integers(0, config.vocab_size, (1, 16)).tolist()
    model.generate(rows, max_new_tokens=args.full_width_tokens)  # compiles
    per_token = active_param_bytes(config, 2)
    # The probe runs right before each decode: this VM's read bandwidth moved between 43 and
    # 75 GB/s over minutes, so a probe taken once set some runs' roofline from another phase.
    bandwidths, rates = [], []
    for _ in range(3):
        bandwidths.append(read_bandwidth())
        rates.append(
            model.generate(rows, max_new_tokens=args.full_width_tokens).decode_tokens_per_s
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
        BANDWIDTH_BYTES / median_s(lambda f=f: jax.block_until_ready(f(x)), 5) for f in reads
    )


def active_param_bytes(config: GrokConfig, itemsize: int) -> int:
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
