"""The TPU kernels (``grok.kernels.tpu``) and the programs compiled for a TPU slice.

- Each Pallas kernel in Pallas' interpreter on the CPU against the float64 reference: the
  flash attention (decode, a prompt at an offset, several query and key blocks, one kv head
  and several, a layer of a stacked cache, no cap and no temperature) and the grouped expert
  product (bf16 and FP8/int8 weights with their scales, a layer of stacked experts, an expert
  with no rows, rows past the sizes' total).
- ``TpuKernels`` (interpreted) in the tiny model: prefill and a decode step equal to XLA's.
- With libtpu (the ``tpu`` extra; skipped with the reason where it is missing): the tiny
  configs' prefill and decode programs compiled for TPU slices by ``grok.tpu_plan`` (what
  ``grok-plan --topology`` runs); a TPU-shaped model's decode updating its cache in place,
  reading the experts and the embedding where they lie; the lowered program the same
  whatever the host's default backend; ``grok-plan --topology`` on a tiny preset.
"""

from __future__ import annotations

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    attention_config,
    check_lowering_ignores_host_backend,
    quantised_params,
    random_params,
)
from reference import reference_cached_attention, rel_err

from grok import tpu_plan
from grok.attention import attention_temperature
from grok.cli import plan as plan_cli
from grok.kernels import XlaKernels, select
from grok.kernels.tpu import TpuKernels
from grok.kernels.tpu.flash_attention import flash_attention
from grok.kernels.tpu.grouped_matmul import grouped_matmul
from grok.kv_cache import KVCache
from grok.model import forward_fns
from grok.presets import GROK2, TINY_GROK1, TINY_GROK2
from grok.quant import quantize
from grok.rope import rope_table
from grok.sharding import activation_sharding, auto_axes, make_mesh

tpu_plan.compile_only_environment()  # libtpu loaded to compile only, quietly

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler to compile for "
    "a TPU topology",
)
RTOL = 1e-5  # of the largest |reference| entry, float32


# The flash attention kernel.

# (B, T, S, K, G, H, cap, temperature_len, layers): S past T puts the prompt at an offset.
ATTENTION_CASES = [
    (3, 1, 40, 2, 4, 32, 30.0, 8, 3),  # decode, several kv heads, layer 1 of a stacked cache
    (1, 37, 64, 1, 8, 16, 50.0, 16, 1),  # one kv head (the [L, B, S, H] read); tau > 1
    (1, 130, 1024, 1, 8, 16, 30.0, 100, 1),  # 2 query blocks x 2 key blocks, some skipped
    (2, 20, 20, 2, 2, 16, None, None, 0),  # a plain forward's own keys; no cap, no tau
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "B{}T{}S{}K{}G{}H{}".format(*c))
def test_flash_attention_matches_float64(case):
    b, t, s, kh, g, h, cap, temperature_len, layers = case
    config = attention_config(kh, g, h, cap, temperature_len)
    for seed in range(2):
        rng = np.random.default_rng(seed)
        q = rng.standard_normal((b, t, kh, g, h)) * 2
        k = rng.standard_normal((max(layers, 1), b, s, kh, h)) * 2
        v = rng.standard_normal((max(layers, 1), b, s, kh, h))
        start = rng.integers(0, s - t + 1, b)
        positions = start[:, None] + np.arange(t)[None]  # [B, T]
        lengths = start + t
        layer = min(1, layers - 1) if layers else 0
        keys, values = (jnp.asarray(x, jnp.float32) for x in (k, v))
        if not layers:  # a plain forward hands over [B, S, K, H]
            keys, values = keys[0], values[0]
        got = flash_attention(
            jnp.asarray(q, jnp.float32),
            keys,
            values,
            jnp.int32(layer),
            attention_temperature(jnp.asarray(positions), temperature_len),
            jnp.asarray(positions, jnp.int32),
            jnp.asarray(lengths, jnp.int32),
            scale=config.attn_scale,
            cap=cap,
            interpret=True,
        )
        want = reference_cached_attention(config, q, k[layer], v[layer], positions, lengths)
        assert rel_err(got, want) < RTOL, seed


# The grouped expert product.

# (A rows, In, Out, L, E, weights, rows past the sizes' total)
GROUPED_CASES = [
    (2, 64, 128, 3, 8, "float32", 0),  # decode: two rows, two experts of eight
    (37, 256, 384, 2, 4, "float32", 3),  # rows past the total get 0
    (300, 128, 256, 2, 8, "fp8", 0),  # a prompt's rows; FP8 with per-channel scales
    (16, 64, 32, 1, 8, "int8", 0),
]


@pytest.mark.parametrize("case", GROUPED_CASES, ids=lambda c: f"A{c[0]}_{c[5]}")
def test_grouped_matmul_matches_float64(case):
    a, d_in, d_out, layers, e, kind, past = case
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((a, d_in))
    w = rng.standard_normal((layers, e, d_out, d_in)) / np.sqrt(d_in)
    sizes = np.bincount(rng.integers(0, e - 1, a - past), minlength=e)  # expert e-1: no rows
    scale = None
    if kind != "float32":
        q, scale = quantize(jnp.asarray(w, jnp.float32), kind, in_dims=(3,))
        w = np.asarray(q.astype(jnp.float32), np.float64) * np.asarray(scale, np.float64)
        weights = q
    else:
        weights = jnp.asarray(w, jnp.float32)
    layer = layers - 1
    got = grouped_matmul(
        jnp.asarray(xs, jnp.float32),
        weights,
        scale,
        jnp.int32(layer),
        jnp.asarray(sizes, jnp.int32),
        interpret=True,
    )
    group = np.repeat(np.arange(e), sizes)  # [A - past]
    want = np.zeros((a, d_out))
    want[: len(group)] = np.einsum("ai,aoi->ao", xs[: len(group)], w[layer, group])
    assert rel_err(got, want) < RTOL


# The kernels in the model.


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (the CPU mesh of conftest)")
@pytest.mark.parametrize(
    "mesh_shape", [(1, 2), (2, 4)], ids=["kv-heads-split", "kv-heads-replicated-rows-split"]
)
def test_tpu_kernels_in_the_model_equal_xla(mesh_shape):
    """The tiny Grok-2 (float32) on ``TpuKernels`` (interpreted) over a CPU mesh: a prefill
    into a cache and a decode step give XLA's logits and cache, with its 2 kv heads split over
    ``model`` (as Grok-2's 8 over a v5p slice of 8), or replicated over it (the query heads
    split) with the batch and the experts' rows over ``data``."""
    config, dt = TINY_GROK2, jnp.dtype(jnp.float32)
    mesh = auto_axes(make_mesh(*mesh_shape))
    params, rope = random_params(config), rope_table(config, 32)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 8)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
    lengths = jnp.asarray([8, 5], jnp.int32)
    step = jnp.asarray([[3], [7]], jnp.int32)

    def run(kernels, sharding):
        apply = jax.jit(forward_fns(config, dt, "auto", None, sharding, kernels).apply)
        cache = KVCache.create(config, 2, 16, dt)
        prompt, cache = apply(params, tokens, positions, rope, cache, lengths)
        decoded, cache = apply(params, step, lengths[:, None], rope, cache, lengths + 1)
        return prompt, decoded, cache.k, cache.v

    kernels = run(TpuKernels(mesh=mesh, interpret=True), activation_sharding(mesh))
    for got, want in zip(kernels, run(XlaKernels("cpu"), None), strict=True):
        assert rel_err(got, want) < RTOL


@pytest.mark.parametrize("mode", ["fp8", "fp8-block"])
def test_tpu_kernels_quantised_equal_xla(mode):
    """The tiny Grok-1 (bfloat16) with every matrix quantised in ``mode`` on ``TpuKernels``
    (one device, interpreted): XLA's logits. Per-channel scales go through the grouped
    kernel; row-block scales ("fp8-block", an FP8 checkpoint's 128x128 tiles) through XLA's
    path, which dequantises them."""
    config, dt = TINY_GROK1.replace(hidden_size=160, moe_intermediate_size=136), jnp.bfloat16
    params = jax.tree.map(lambda a: a.astype(dt), random_params(config))
    quant, _ = quantised_params(config, params, mode)
    tokens = jnp.asarray([[3, 4, 5, 6]], jnp.int32)
    positions = jnp.arange(4, dtype=jnp.int32)[None]

    def run(kernels):
        apply = jax.jit(forward_fns(config, jnp.dtype(dt), "auto", mode, None, kernels).apply)
        rope = rope_table(config, 16)
        return apply(quant, tokens, positions, rope, None, positions[:, -1] + 1)[0]

    got, want = run(TpuKernels(interpret=True)), run(XlaKernels("cpu"))
    assert rel_err(got, want) < 2e-2  # bfloat16 activations, summed in another order


# Compiled for TPU slices (libtpu's compiler; nothing runs).


@needs_libtpu
def test_tiny_programs_compile_for_a_tpu_slice():
    """The tiny Grok-1 with FP8 weights on a v5e slice of 4 (the tiny Grok-2 on a v5p slice:
    ``test_plan_cli_compiles_for_a_topology``): the kernels in both programs, the cache
    donated."""
    config = TINY_GROK1
    devices = tpu_plan.topology_devices("v5e:2x2")
    setup = tpu_plan.slice_setup(config, devices, quantize="fp8")
    assert isinstance(select(jnp.bfloat16, mesh=setup.mesh), TpuKernels)
    prefill = tpu_plan.compile_prefill(setup, batch=2, tokens=16, slots=32)
    decode = tpu_plan.compile_decode(setup, batch=2, slots=32)
    assert "tpu_custom_call" in prefill.hlo and "tpu_custom_call" in decode.hlo  # the kernels
    cache = 2 * 2 * 32 * config.num_hidden_layers * config.head_dim * 2  # k and v, bf16
    assert decode.alias_bytes >= cache // 4  # the donated cache (K over 4 chips at most)


def _tpu_shaped(num_kv_heads: int):
    """A two-layer model with Grok-2's head dim and tile-sized widths, on a v5p slice of 4."""
    config = GROK2.replace(
        vocab_size=4096,
        hidden_size=1024,
        num_hidden_layers=2,
        num_attention_heads=2 * num_kv_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=1024,
        moe_intermediate_size=512,
        num_local_experts=4,
        max_position_embeddings=8192,
    )
    return config, tpu_plan.topology_devices("v5p:2x2x1")


def _materialized_copies(hlo: str) -> set[tuple[int, ...]]:
    """Shapes of the buffers a compiled program fills by copying, transposing or all-gathering
    an array: such instructions of the computations that run as such (the entry, loop
    bodies), and fusions there whose root is a copy or a transpose. (Inside a fusion a copy
    is a relayout on the way to its consumer: no buffer of its own.)"""
    computations: dict[str, list[str]] = {}
    name = None
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?%(\S+) \(", line)
        if header:
            name = header.group(1)
            computations[name] = []
        elif name is not None:
            computations[name].append(line)
    fused = {
        c
        for ls in computations.values()
        for l in ls
        for c in re.findall(r"calls=%([\w.\-]+)", l)
        if " fusion(" in l
    }

    def root_copies(computation: str) -> bool:
        root = [l for l in computations.get(computation, []) if "ROOT" in l]
        return bool(root) and re.search(r" (copy|transpose)\(", root[0]) is not None

    shapes = set()
    for computation, lines in computations.items():
        if computation in fused:
            continue
        for l in lines:
            made = re.match(r"\s*(?:ROOT )?%\S+ = \w+\[([\d,]*)\]\S* (\S+?)\(", l)
            if made is None:
                continue
            op = made.group(2)
            called = re.search(r"calls=%([\w.\-]+)", l)
            if op in ("copy", "transpose", "all-gather") or (
                op == "fusion" and called and root_copies(called.group(1))
            ):
                shapes.add(tuple(int(n) for n in made.group(1).split(",") if n))
    return shapes


@needs_libtpu
@pytest.mark.parametrize(("kv_heads", "quantize"), [(4, None), (8, "fp8")], ids=["K1", "K2-fp8"])
def test_decode_reads_and_writes_in_place(kv_heads, quantize):
    """Batch 8, 8192 slots, one or two kv heads per chip: the compiled decode loop copies
    neither the cache nor a stacked weight (its temporaries are less than the keys' cache),
    and gathers no embedding table whole; its arguments are the plan's."""
    config, devices = _tpu_shaped(kv_heads)
    setup = tpu_plan.slice_setup(config, devices, quantize=quantize)
    decode = tpu_plan.compile_decode(setup, batch=8, slots=8192)
    assert "tpu_custom_call" in decode.hlo  # the kernels
    local_k = (2, 8, 8192, kv_heads // 4, 128)  # [L, B, S, K, H] per chip
    assert decode.temp_bytes < np.prod(local_k) * 2  # bf16 keys
    shapes = _materialized_copies(decode.hlo)
    assert local_k not in shapes  # the cache
    assert (2, 4, 128, 1024) not in shapes and (2, 4, 1024, 128) not in shapes  # the experts
    assert not any(s and s[0] == config.vocab_size for s in shapes)  # the [V, D] table
    plan = setup.load.memory.weights + 2 * np.prod(local_k) * 2
    rope = 2 * config.max_position_embeddings * 64 * 4  # two float32 [P, H/2] tables
    assert decode.argument_bytes == pytest.approx(plan + rope, rel=0.01)


@needs_libtpu
def test_tpu_lowering_does_not_depend_on_the_host_backend(monkeypatch):
    """The forward for a TPU slice lowers to the same program whatever ``jax.default_backend``
    answers (the kernels follow the mesh's devices), and not to XLA's program."""
    devices = tpu_plan.topology_devices("v5p:2x2x1")
    mesh = auto_axes(make_mesh(1, 4, devices=devices))
    check_lowering_ignores_host_backend(mesh, monkeypatch)


@needs_libtpu
@pytest.mark.slow
def test_plan_cli_compiles_for_a_topology(capsys):
    argv = ["--config", "tiny-grok2", "--topology", "v5p:2x2x1", "--batch", "2", "--context", "32"]
    assert plan_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "4 x TPU v5" in out and "prefill B=1 T=32 S=32" in out and "decode B=2 S=32" in out
    assert re.search(r"largest batch: B=\d+ x S=32 \(compiled", out)
    # A chip too small: one line naming the program and the shortfall, exit status 1.
    assert plan_cli.main([*argv, "--device-gb", "0.000001"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"grok-plan: error: prefill B=1 .* GiB short$", err[0])
