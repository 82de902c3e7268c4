"""What ``device_check`` measures and what it sets the timings against: the shapes, the
device's own rooflines (copy bandwidth, bf16 matmul rate), and the model's work per call.

FLOPs count the matmuls of the active parameters (attention projections, dense MLP, the k
chosen experts, the router, the head at the positions computed) and causal attention. Bytes
count every weight read once per call (for decode, the experts each batch is expected to
touch under uniform routing, ``E * (1 - (1 - k/E)^B)`` of E, and B embedding rows), the KV
cache read (decode) or written (prefill).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from grok.config import GrokConfig
from grok.presets import GROK2
from grok.testing import param_shapes

FULL = GROK2  # D 8192, 64/8 heads of 128, F 32768, 8 x 16384 experts, V 131072
# Reduced widths with the same structure (GQA 8:1, residual MoE, 8 experts top-2): the CPU run.
SMALL = GROK2.replace(
    vocab_size=2048,
    hidden_size=256,
    num_attention_heads=8,
    num_key_value_heads=1,
    head_dim=32,
    intermediate_size=1024,
    moe_intermediate_size=512,
    embedding_multiplier_scale=256**0.5,
    attn_temperature_len=64,
)
HEADROOM_BYTES = 24 << 30  # device memory kept free of weights and cache (activations)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What to measure."""

    config: GrokConfig
    prefill_lengths: tuple[int, ...]
    decode_batches: tuple[int, ...]
    decode_context: int  # filled cache slots a decode step attends to
    copy_bytes: int  # bytes of the array the copy bandwidth is measured on
    matmul_n: int  # [n, n] x [n, n]


FULL_SHAPES = Shapes(FULL, (2048, 8192), (1, 8, 64), 2048, 4 << 30, 8192)
SMALL_SHAPES = Shapes(SMALL, (64, 256), (1, 8, 64), 128, 64 << 20, 1024)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(first call's seconds, compiling included; median of ``repeats`` further calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def copy_bandwidth(nbytes: int, repeats: int) -> dict[str, float]:
    """``y = x + 1`` over ``nbytes`` of bfloat16: reads and writes each byte once."""
    x = jnp.zeros((nbytes // 2 // 4096, 4096), jnp.bfloat16)  # 2-D: no index past 2^31
    add = jax.jit(lambda x: x + jnp.asarray(1, x.dtype))
    _, t = timed(lambda: add(x), repeats)
    return {"bytes": nbytes, "seconds": t, "bytes_per_s": 2 * nbytes / t}


def matmul_rate(n: int, repeats: int) -> dict[str, float]:
    """[n, n] x [n, n] in bfloat16 with float32 accumulation, bfloat16 out."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    mm = jax.jit(
        lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    )
    _, t = timed(lambda: mm(a, b), repeats)
    return {"n": n, "seconds": t, "flops_per_s": 2 * n**3 / t}


def nbytes(tree: Any) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


@dataclasses.dataclass(frozen=True)
class Costs:
    """Per-call work of the model: parameter bytes by part, active matmul parameters."""

    expert_bytes: int  # all layers' experts (scales included)
    embed_bytes: int
    other_bytes: int  # everything else (attention, dense MLP, router, norms, head)
    active_params: int  # matmul parameters one token uses in the layers (k experts)
    head_params: int  # D * V


def model_costs(config: GrokConfig, quant: str | None) -> Costs:
    """The bytes of ``config``'s bf16 (or ``quant``) parameters by part, and its work."""
    c = config
    expert = embed = other = 0
    for module, leaves in param_shapes(c, jnp.dtype(jnp.bfloat16), quant).items():
        for name, s in leaves.items():
            n = s.size * jnp.dtype(s.dtype).itemsize
            if module.endswith("experts"):
                expert += n
            elif name == "embed_tokens":
                embed += n
            else:
                other += n
    d, h = c.hidden_size, c.head_dim
    attn = d * h * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    dense = 3 * d * c.intermediate_size if c.has_dense_mlp else 0
    experts = c.num_experts_per_tok * 3 * d * c.moe_intermediate_size
    router = d * c.num_local_experts
    active = c.num_hidden_layers * (attn + dense + experts + router)
    return Costs(expert, embed, other, active, d * c.vocab_size)


def expected_experts(batch: int, experts: int, k: int) -> float:
    """Experts a batch of ``batch`` tokens touches per layer under uniform top-k routing."""
    return experts * (1.0 - (1.0 - k / experts) ** batch)


def kv_bytes(config: GrokConfig, batch: int, slots: int, itemsize: int) -> int:
    c = config
    return c.num_hidden_layers * batch * slots * 2 * c.num_key_value_heads * c.head_dim * itemsize


def attention_flops(config: GrokConfig, queries: int, keys: int) -> float:
    """Q K^T and P V over ``keys`` positions for ``queries`` rows, every layer."""
    c = config
    return 4.0 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * queries * keys


def layers_for_memory(shapes: Shapes, limit: int | None, quant: str | None) -> int:
    """How many layers fit in ``limit`` bytes beside ``HEADROOM_BYTES``: the bf16 weights
    (the larger format, so one N serves both) and the largest decode cache; 2 without a limit."""
    if limit is None:
        return 2
    one = shapes.config.replace(num_hidden_layers=1)
    costs = model_costs(one, quant)
    per_layer = costs.expert_bytes + costs.other_bytes - 2 * costs.head_params
    per_layer += kv_bytes(one, max(shapes.decode_batches), shapes.decode_context + 1, 2)
    fixed = costs.embed_bytes + 2 * costs.head_params  # the embedding and the head
    return max(1, int((limit - HEADROOM_BYTES - fixed) // per_layer))
