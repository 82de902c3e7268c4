"""The kernel seam (``grok.kernels``): which implementation the selector picks, the CPU
implementation's views and products against XLA's, the model on each, and that nothing on the
model's path looks at the host's default backend.

- ``select``: the native CPU kernels for one CPU device (their views and bits without kernel
  calls for a dtype without a kernel, or ``GROK_NATIVE=0`` in a fresh interpreter:
  ``test_native.py``'s fallback tests), XLA's for a mesh, quantised weights, training, another
  platform.
- ``Stacked`` views: slicing, chained indexing, reshape, ``dense``; ``CpuKernels.project``.
- The tiny Grok-2 and Grok-1 models: a prefill and a decode step with a KV cache on the native
  kernels and on XLA's (float32: equal logits and caches, for each expert path; bfloat16: no
  worse than XLA against the float32 model), and the kernels really in the lowered program.
- The XLA path's lowered program on an 8-device mesh is the same whatever the host's default
  backend says; no model module calls ``jax.default_backend``.

The kernel tests skip where ``cpu.available`` is False (no AVX-512, no compiler, ...).
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    check_lowering_ignores_host_backend,
    needs_bf16,
    needs_f32,
    quantised_params,
    random_params,
)
from reference import rel_err

from grok.api import Model
from grok.config import GrokConfig
from grok.kernels import XlaKernels, cpu, select
from grok.kernels.cpu.ops import CpuKernels, Stacked, stacked
from grok.kv_cache import KVCache
from grok.model import forward_fns
from grok.presets import TINY_GROK1, TINY_GROK2
from grok.rope import rope_table
from grok.sharding import auto_axes, make_mesh

PACKAGE = Path(__file__).resolve().parents[2] / "grok"
RTOL = 1e-5  # of the largest |reference| entry
CPU = CpuKernels()
XLA_CPU = XlaKernels("cpu")  # XLA's path as the selector gives it for CPU devices


def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> jax.Array:
    """Standard normal draws, rounded to ``dtype``."""
    return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)


def _f64(x: jax.Array) -> np.ndarray:
    """An array upcast exactly to float64 (bfloat16 through float32)."""
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.uint16)


# The selector.


class _Device:
    """A stand-in for a device of another platform (the selector reads only ``platform``)."""

    def __init__(self, platform: str):
        self.platform = platform


@needs_f32
def test_select_native_for_one_cpu_device():
    one = jax.devices("cpu")[:1]
    assert select(jnp.float32, devices=one) == CPU
    for mode in ("fp8", "fp8-block", "int8"):  # quantised weights too (src/quant.cc)
        assert select(jnp.float32, devices=one, quant=mode) == CPU
    params = jax.device_put(random_params(TINY_GROK2), one[0])
    assert Model(TINY_GROK2, params, dtype=jnp.float32).kernels == CPU


def test_select_xla_elsewhere(monkeypatch):
    one = jax.devices("cpu")[:1]
    assert select(jnp.float32, devices=one, training=True) == XLA_CPU
    # No kernel for float16: one CPU device still gets the CPU views and bits, without calls.
    assert select(jnp.float16, devices=one) == CpuKernels(native=False)

    def no_build(dtype):  # another platform's program never builds the CPU kernels
        raise AssertionError("cpu.available asked for a GPU program")

    monkeypatch.setattr(cpu, "available", no_build)
    assert select(jnp.bfloat16, devices=[_Device("gpu")]) == XlaKernels("gpu")
    assert select(jnp.bfloat16, devices=[_Device("tpu")] * 4) == XlaKernels("tpu")
    with pytest.raises(ValueError, match="one platform"):
        select(jnp.float32, devices=[])
    with pytest.raises(ValueError, match="one platform"):
        select(jnp.float32, devices=[_Device("gpu"), _Device("cpu")])


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (the CPU mesh of conftest)")
def test_select_xla_on_a_mesh():
    mesh = auto_axes(make_mesh(2, 4))
    assert select(jnp.float32, mesh=mesh) == XLA_CPU
    assert select(jnp.float32, devices=jax.devices()[:2]) == XLA_CPU  # two devices, no mesh
    params = random_params(TINY_GROK2)
    assert Model(TINY_GROK2, params, dtype=jnp.float32, mesh=mesh).kernels == XLA_CPU


def test_xla_choices_follow_the_platform():
    """The XLA path's platform-dependent choices come from its platform: the row padding of
    a one-row bf16 product on the CPU, and the prefill expert path."""
    x = jnp.ones((1, 1, 8), jnp.bfloat16)
    w = jnp.ones((4, 8), jnp.bfloat16)
    texts = {
        p: jax.jit(XlaKernels(p).project, static_argnums=0).lower("BTD,VD->BTV", x, w).as_text()
        for p in ("cpu", "gpu")
    }
    assert "2x1x8xbf16" in texts["cpu"] and "2x1x8xbf16" not in texts["gpu"]
    assert XlaKernels("cpu").expert_path(64, 128, 8) == "blocks"
    assert XlaKernels("tpu").expert_path(64, 128, 8) == "ragged"
    assert XlaKernels("tpu").expert_path(2, 4, 8) == "gather"
    assert CPU.expert_path(2, 4, 8) == "ragged" and CPU.expert_path(1, 2, 8) == "gather"


# The CPU implementation's views and products.


def test_stacked_materialize_equals_slice():
    rng = np.random.default_rng(5)
    w = _random(rng, (3, 4, 5, 6), jnp.float32)
    view = stacked(w)
    assert view.shape == (3, 4, 5, 6) and view.ndim == 4 and view.dtype == jnp.float32
    np.testing.assert_array_equal(view.materialize(), w)
    for a, b in [(0, 0), (2, 3), (1, 2)]:
        one = view[jnp.int32(a)]
        assert one.shape == (4, 5, 6) and one.ndim == 3
        np.testing.assert_array_equal(one.materialize(), w[a])
        chained, pair = one[jnp.int32(b)], view[jnp.int32(a), jnp.int32(b)]
        assert chained.shape == pair.shape == (5, 6)
        assert len(chained.index) == len(pair.index) == 2
        np.testing.assert_array_equal(chained.materialize(), w[a, b])
        np.testing.assert_array_equal(pair.materialize(), w[a, b])
    # Traced indices, under jit, as the layer loop takes them.
    take = jax.jit(lambda w, a, b: stacked(w)[a][b].materialize())
    np.testing.assert_array_equal(take(w, jnp.int32(2), jnp.int32(1)), w[2, 1])


def test_stacked_bfloat16_bits():
    rng = np.random.default_rng(6)
    w = _random(rng, (3, 4, 8), jnp.bfloat16)
    view = stacked(_bits(w), jnp.bfloat16)
    assert view.dtype == jnp.bfloat16 and view.array.dtype == jnp.uint16
    for a in range(3):
        got = view[jnp.int32(a)].materialize()
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(_bits(got), _bits(w[a]))
    whole = view.materialize()
    assert whole.dtype == jnp.bfloat16
    np.testing.assert_array_equal(_bits(whole), _bits(w))


def test_stacked_reshape_keeps_index():
    w = jnp.arange(3 * 4 * 6, dtype=jnp.float32).reshape(3, 4, 6)
    view = stacked(w)[jnp.int32(1)]
    flat = view.reshape(24)
    assert flat.index == view.index and flat.shape == (24,)
    np.testing.assert_array_equal(flat.materialize(), w[1].reshape(24))
    split = view.reshape(2, 2, 6)
    assert split.shape == (2, 2, 6) and split.array.shape == (3, 2, 2, 6)
    np.testing.assert_array_equal(split.materialize(), w[1].reshape(2, 2, 6))
    np.testing.assert_array_equal(split[jnp.int32(1)].materialize(), w[1, 2:4])


def test_dense():
    w = jnp.ones((2, 3), jnp.float32)
    assert CPU.dense(w) is w
    assert isinstance(stacked(w)[jnp.int32(0)], Stacked)
    got = CPU.dense(stacked(w * jnp.arange(2.0)[:, None])[jnp.int32(1)])
    assert not isinstance(got, Stacked)
    np.testing.assert_array_equal(got, np.ones(3))
    cast = stacked(w)[jnp.int32(1)].astype(jnp.bfloat16)  # what dequant does to another dtype
    assert cast.dtype == jnp.bfloat16 and cast.shape == (3,)


@needs_f32
@pytest.mark.parametrize("rows", [2, 8, 12])
def test_project_uses_kernel_up_to_max_rows(rows):
    """``project`` on a view: the einsum's values either way, the kernel only in the CPU
    implementation and for at most ``MAX_ROWS`` rows (XLA's is given the matrix sliced out)."""
    rng = np.random.default_rng(rows)
    x = _random(rng, (rows // 2, 2, 24), jnp.float32)  # [B, T, D]
    w = _random(rng, (3, 10, 24), jnp.float32)  # [L, V, D]

    def fn(on: bool) -> Callable:
        def f(x, w, layer):
            if on:
                return CPU.project("BTD,VD->BTV", x, stacked(w)[layer])
            return XLA_CPU.project("BTD,VD->BTV", x, w[layer])

        return jax.jit(f)

    want = np.einsum("btd,vd->btv", _f64(x), _f64(w)[2])
    for on in (False, True):
        got = fn(on)(x, w, jnp.int32(2))
        assert got.shape == (rows // 2, 2, 10)
        assert rel_err(got, want) <= RTOL
        text = fn(on).lower(x, w, jnp.int32(2)).as_text()
        assert (cpu.MATVEC_TARGET in text) == (on and rows <= cpu.MAX_ROWS)


@needs_bf16
@pytest.mark.parametrize("rows", [12, 80])
def test_project_bfloat16_view_uses_kernel_at_any_rows(rows):
    """A bf16 view goes through the kernel at prefill sizes too (float32 stays with XLA's GEMM
    above ``MAX_ROWS``, the test above): the einsum's values, rounded to bf16."""
    rng = np.random.default_rng(rows)
    x = _random(rng, (rows // 2, 2, 40), jnp.bfloat16)  # [B, T, D]
    w = _random(rng, (3, 33, 40), jnp.bfloat16)  # [L, V, D]

    def f(x, w, layer):
        return CPU.project("BTD,VD->BTV", x, stacked(w)[layer], jnp.float32)

    got = jax.jit(f)(x, w, jnp.int32(1))
    assert rel_err(got, np.einsum("btd,vd->btv", _f64(x), _f64(w)[1])) <= RTOL
    assert cpu.MATVEC_TARGET in jax.jit(f).lower(x, w, jnp.int32(1)).as_text()


# The model, kernel on and off.

BATCH, PROMPT, SLOTS = 2, 5, 8
CONFIGS = [pytest.param(TINY_GROK2, id="grok2"), pytest.param(TINY_GROK1, id="grok1")]


@functools.cache
def _apply(config: GrokConfig, dtype: str, moe_impl: str, on: bool) -> Callable:
    """The jitted apply, one per (config, dtype, expert path, kernels: native or XLA's)."""
    fns = forward_fns(config, jnp.dtype(dtype), moe_impl, kernels=CPU if on else XLA_CPU)
    return jax.jit(fns.apply)


def _inputs(config: GrokConfig) -> tuple[jax.Array, jax.Array]:
    """A prompt [B, PROMPT] and the next token [B, 1]."""
    tokens = np.random.default_rng(7).integers(0, config.vocab_size, (BATCH, PROMPT + 1))
    tokens = jnp.asarray(tokens, jnp.int32)
    return tokens[:, :PROMPT], tokens[:, PROMPT:]


def _prefill_args(config: GrokConfig, params: dict, dtype) -> tuple:
    prompt, _ = _inputs(config)
    positions = jnp.broadcast_to(jnp.arange(PROMPT, dtype=jnp.int32), prompt.shape)
    cache = KVCache.create(config, BATCH, SLOTS, dtype)
    lengths = jnp.full((BATCH,), PROMPT, jnp.int32)
    return params, prompt, positions, rope_table(config, SLOTS), cache, lengths


def _decode_args(config: GrokConfig, params: dict, cache: KVCache) -> tuple:
    _, token = _inputs(config)
    positions = jnp.full((BATCH, 1), PROMPT, jnp.int32)
    lengths = jnp.full((BATCH,), PROMPT + 1, jnp.int32)
    return params, token, positions, rope_table(config, SLOTS), cache, lengths


def _run(config: GrokConfig, params: dict, dtype, on: bool, decode_impl: str = "auto"):
    """(prefill logits, its cache, decode logits, its cache) through one path."""
    name = jnp.dtype(dtype).name
    logits, cache = _apply(config, name, "auto", on)(*_prefill_args(config, params, dtype))
    step, new = _apply(config, name, decode_impl, on)(*_decode_args(config, params, cache))
    return logits, cache, step, new


def _assert_caches_close(got: KVCache, want: KVCache) -> None:
    assert got.k.dtype == want.k.dtype and got.v.dtype == want.v.dtype
    assert rel_err(got.k, want.k) <= RTOL and rel_err(got.v, want.v) <= RTOL
    np.testing.assert_array_equal(got.lengths, want.lengths)


@functools.cache
def _params(config: GrokConfig, dtype: str) -> dict:
    """``random_params`` in ``dtype``, the router kept float32 (as the library keeps it)."""
    params = random_params(config, seed=11)
    return {
        m: {n: x if n == "router" else x.astype(dtype) for n, x in leaves.items()}
        for m, leaves in params.items()
    }


@needs_f32
@pytest.mark.parametrize("config", CONFIGS)
def test_model_float32_kernel_equals_xla(config):
    params = _params(config, "float32")
    on = _run(config, params, jnp.float32, True)
    off = _run(config, params, jnp.float32, False)
    assert on[0].shape == (BATCH, PROMPT, config.vocab_size)
    assert on[2].shape == (BATCH, 1, config.vocab_size)
    for i in (0, 2):
        assert rel_err(on[i], off[i]) <= RTOL, ("prefill", "decode")[i // 2]
    for i in (1, 3):
        _assert_caches_close(on[i], off[i])
    # The prefill wrote its slots and the decode its one more (and nothing else).
    k = np.asarray(on[3].k)
    assert np.all(np.any(k[:, :, : PROMPT + 1] != 0, axis=(3, 4)))
    assert not np.any(k[:, :, PROMPT + 1 :])


@needs_f32
@pytest.mark.parametrize("moe_impl", ["gather", "blocks"])
@pytest.mark.parametrize("config", CONFIGS)
def test_model_float32_decode_expert_paths(config, moe_impl):
    params = _params(config, "float32")
    _, _, on, on_cache = _run(config, params, jnp.float32, True, moe_impl)
    _, _, off, off_cache = _run(config, params, jnp.float32, False, moe_impl)
    assert rel_err(on, off) <= RTOL
    _assert_caches_close(on_cache, off_cache)
    # And the same as the default ("auto") decode.
    _, _, auto, _ = _run(config, params, jnp.float32, False)
    assert rel_err(on, auto) <= RTOL


@needs_f32
@pytest.mark.parametrize("config", CONFIGS)
def test_model_lowering_uses_kernel_only_when_on(config):
    params = _params(config, "float32")
    _, cache = _apply(config, "float32", "auto", False)(*_prefill_args(config, params, jnp.float32))
    args = _decode_args(config, params, cache)
    assert cpu.MATVEC_TARGET == "grok_matvec"
    assert "grok_matvec" in _apply(config, "float32", "auto", True).lower(*args).as_text()
    assert "grok_matvec" not in _apply(config, "float32", "auto", False).lower(*args).as_text()
    assert cpu.ATTENTION_TARGET == "grok_attention"
    assert "grok_attention" in _apply(config, "float32", "auto", True).lower(*args).as_text()
    assert "grok_attention" not in _apply(config, "float32", "auto", False).lower(*args).as_text()


@needs_bf16
@pytest.mark.parametrize("config", CONFIGS)
def test_model_bfloat16_kernel_no_worse_than_xla(config):
    params = _params(config, "bfloat16")
    router = params["grok/layers/layer/moe"]["router"]
    assert router.dtype == jnp.float32
    assert params["grok/layers/layer/attn"]["q_proj"].dtype == jnp.bfloat16
    exact = jax.tree.map(lambda x: x.astype(jnp.float32), params)  # the same values, upcast
    _, _, want, _ = _run(config, exact, jnp.float32, False)
    _, _, native_step, _ = _run(config, params, jnp.bfloat16, True)
    _, _, xla_step, _ = _run(config, params, jnp.bfloat16, False)
    err_native, err_xla = rel_err(native_step, want), rel_err(xla_step, want)
    assert err_native <= 1.5 * err_xla + 1e-3, (err_native, err_xla)
    assert err_xla < 0.05, err_xla  # bfloat16 rounding, not a broken model
    # The bfloat16 decode lowers to the kernel, too.
    _, cache = _apply(config, "bfloat16", "auto", False)(
        *_prefill_args(config, params, jnp.bfloat16)
    )
    text = _apply(config, "bfloat16", "auto", True).lower(*_decode_args(config, params, cache))
    assert "grok_matvec" in text.as_text()


# Quantised weights (grok.quant's modes) on the kernels that read codes and scales in place.
# Widths past 128 inputs: several scales per row in "fp8-block", and tails.
QUANT_CONFIG = TINY_GROK1.replace(hidden_size=160, moe_intermediate_size=136)
needs_codes = pytest.mark.skipif(
    not cpu.available_codes(jnp.bfloat16, jnp.float8_e4m3fn),
    reason=f"no quantised kernels: {cpu.why_unavailable() or 'no AVX512-BF16 and AVX512-VBMI'}",
)


@functools.cache
def _quantised(mode: str) -> tuple[dict, dict]:
    """(bfloat16 parameters with every matrix quantised in ``mode``, the same values
    dequantised to float32 as plain parameters)."""
    return quantised_params(QUANT_CONFIG, _params(QUANT_CONFIG, "bfloat16"), mode)


@needs_codes
@pytest.mark.parametrize(
    ("mode", "moe_impl"), [("fp8", "auto"), ("fp8-block", "gather"), ("int8", "auto")]
)
def test_model_quantised_kernel_no_worse_than_xla(mode, moe_impl):
    """Prefill and a decode step on the quantised kernels (grouped experts, or each chosen
    expert's matrix) against XLA dequantising to bfloat16, both against float32 on the same
    values: no worse, and the program calls the kernels."""
    quant, exact = _quantised(mode)
    config = QUANT_CONFIG
    _, _, want, _ = _run(config, exact, jnp.float32, False, moe_impl)
    steps = {}
    for on in (True, False):
        fns = forward_fns(
            config, jnp.dtype(jnp.bfloat16), moe_impl, mode, kernels=CPU if on else XLA_CPU
        )
        apply = jax.jit(fns.apply)
        logits, cache = apply(*_prefill_args(config, quant, jnp.bfloat16))
        steps[on] = apply(*_decode_args(config, quant, cache))[0]
        if on:
            text = apply.lower(*_decode_args(config, quant, cache)).as_text()
            assert cpu.QUANT_MATVEC_TARGET in text
            grouped = cpu.QUANT_GROUPED_TARGET in text
            assert grouped == (moe_impl == "auto"), text.count(cpu.QUANT_GROUPED_TARGET)
    err_native, err_xla = rel_err(steps[True], want), rel_err(steps[False], want)
    assert err_native <= 1.5 * err_xla + 1e-3, (err_native, err_xla)
    assert err_xla < 0.05, err_xla


def _bf16_router_logits(on: bool, dtype=jnp.bfloat16) -> np.ndarray:
    """Logits of a tree cast whole to bf16 (the router included, which the layers ask for as
    float32), on the native kernels or XLA's; ``dtype`` float32: the same values upcast."""
    cfg = TINY_GROK2
    tree = jax.tree.map(lambda a: a.astype(jnp.bfloat16), random_params(cfg, seed=4))
    tree = jax.tree.map(lambda a: a.astype(dtype), tree)
    tokens = jnp.asarray([[3, 4, 5]], jnp.int32)
    positions = jnp.arange(3, dtype=jnp.int32)[None]
    apply = forward_fns(cfg, jnp.dtype(dtype), kernels=CPU if on else XLA_CPU).apply
    logits, _ = apply(tree, tokens, positions, rope_table(cfg, 16), None, positions[:, -1] + 1)
    return np.asarray(logits, np.float64)


def test_router_stored_in_bfloat16_reads_as_the_float32_model():
    """A former layer loop read the router's uint16 view as integers: the bf16 tree must give
    the float32 model's logits on the same rounded values, up to bf16 rounding."""
    want = _bf16_router_logits(False, jnp.float32)
    assert rel_err(_bf16_router_logits(False), want) < 0.05


@needs_bf16
def test_router_stored_in_bfloat16_reads_the_same_both_ways():
    assert rel_err(_bf16_router_logits(True), _bf16_router_logits(False)) < 1e-3


# The XLA path is compiled for its devices, not for the host.


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (the CPU mesh of conftest)")
def test_xla_lowering_does_not_depend_on_the_host_backend(monkeypatch):
    """The forward for an 8-device CPU mesh (a bf16 decode step and a prefill) lowers to the
    same program whatever ``jax.default_backend`` answers; the same program for TPU devices
    differs (the check can see a difference)."""
    check_lowering_ignores_host_backend(auto_axes(make_mesh(2, 4)), monkeypatch)


# Modules on the model's path: they pick nothing by the host's backend.
MODEL_PATH = [
    "model.py",
    "layers.py",
    "attention.py",
    "moe.py",
    "kv_cache.py",
    "api.py",
    "generate.py",
    "train.py",
    "serve/engine.py",
    *sorted(str(p.relative_to(PACKAGE)) for p in (PACKAGE / "kernels").rglob("*.py")),
]


def _default_backend_reads(source: str) -> list[int]:
    """Lines of ``source`` that name ``default_backend`` (a call, an attribute, an import)."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if (isinstance(node, ast.Attribute) and node.attr == "default_backend")
        or (isinstance(node, ast.Name) and node.id == "default_backend")
        or (isinstance(node, ast.alias) and node.name.endswith("default_backend"))
    ]


@pytest.mark.parametrize("module", MODEL_PATH)
def test_no_model_module_reads_the_default_backend(module):
    found = _default_backend_reads((PACKAGE / module).read_text())
    assert not found, f"grok/{module} reads jax.default_backend at lines {found}"


def test_the_default_backend_check_finds_each_form():
    assert _default_backend_reads("import jax\nx = jax.default_backend()\n") == [2]
    assert _default_backend_reads("from jax import default_backend\n") == [1]
    assert _default_backend_reads("import jax\n\ny = jax.default_backend\n") == [3]
    assert _default_backend_reads("import jax\nx = jax.devices()\n") == []
