"""The native CPU kernel (``grok.native.matvec``), the ``Stacked`` weight views, and the model
with the kernel on against the same model through XLA's dot.

- ``matvec`` against a float64 numpy product, float32 and bfloat16, over row counts below, at
  and above ``MAX_ROWS`` (more passes), widths and heights with vector tails, one matrix big
  enough for the thread pool, zero to two stacked axes, traced indices and clamped ones;
  bfloat16's uint16 bits; its gradient; the ValueErrors it raises.
- ``Stacked``: slicing, chained indexing, reshape, ``dense``; ``project`` in
  ``native_kernels(True)``.
- The tiny Grok-2 and Grok-1 models: a prefill and a decode step with a KV cache, kernel on and
  off (float32: equal logits and caches, for each expert path; bfloat16: no worse than XLA
  against the float32 model), and the kernel really in the lowered program.
- The fallbacks, in fresh interpreters: ``GROK_NATIVE=0`` and a missing compiler; the source
  builds for CPUs without AVX-512 and without AVX512-BF16.

The kernel tests skip where ``native.available`` is False (no AVX-512, no compiler, ...).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NATIVE_DTYPES as DTYPES
from conftest import needs_bf16, needs_f32, random_params

from grok import native
from grok.config import GrokConfig
from grok.kv_cache import KVCache
from grok.layers import Stacked, dense, native_kernels, project, stacked
from grok.model import forward_fns
from grok.presets import TINY_GROK1, TINY_GROK2
from grok.rope import rope_table

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-5  # of the largest |reference| entry


# Helpers.


def _rel_err(got, want) -> float:
    """max |got - want| / max |want|, in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> jax.Array:
    """Standard normal draws, rounded to ``dtype``."""
    return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)


def _f64(x: jax.Array) -> np.ndarray:
    """An array upcast exactly to float64 (bfloat16 through float32)."""
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _clamped(index: tuple[int, ...], lead: tuple[int, ...]) -> tuple[int, ...]:
    """Indices clamped into range (for indices where ``lax.dynamic_slice`` agrees: in range,
    too large, or below -size)."""
    return tuple(int(np.clip(i, 0, n - 1)) for i, n in zip(index, lead, strict=True))


@functools.cache
def _jit_matvec(lead: int) -> Callable:
    """``matvec`` under jit with ``lead`` traced indices (an int32 vector)."""

    def f(x, w, idx):
        return native.matvec(x, w, tuple(idx[k] for k in range(lead)))

    return jax.jit(f)


def _bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.uint16)


# The kernel.

# (O, I, leading axes of w): tails in I (not a multiple of 16/32) and in O (not a multiple of
# the 4 or 2 output rows per block), and O * I = 76800 >= 65536, which spreads over the pool.
SHAPES = [(5, 7, ()), (130, 100, (3,)), (4, 32, (2, 3)), (300, 256, (2,)), (6, 64, ())]
ROWS = [1, 2, 5, 8, 9, 17]  # above MAX_ROWS the kernel takes more passes


def _indices(lead: tuple[int, ...]) -> list[tuple[int, ...]]:
    """In range (first and last), too large, and far below zero (clamped to 0)."""
    if not lead:
        return [()]
    first, last = tuple(0 for _ in lead), tuple(n - 1 for n in lead)
    high = tuple(n + 5 for n in lead)
    low = tuple(-n - 3 for n in lead)
    mixed = tuple(1 if k % 2 == 0 else -100 for k in range(len(lead)))
    return [first, last, high, low, mixed]


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matvec_matches_float64(dtype, rows):
    assert native.MAX_ROWS == 8  # ROWS brackets it
    rng = np.random.default_rng(rows)
    for o, i, lead in SHAPES:
        x = _random(rng, (rows, i), dtype)
        w = _random(rng, (*lead, o, i), dtype)
        x64, w64 = _f64(x), _f64(w)
        fn = _jit_matvec(len(lead))
        for index in _indices(lead):
            got = fn(x, w, jnp.asarray(index, jnp.int32).reshape(len(lead)))
            assert got.dtype == jnp.float32 and got.shape == (rows, o)
            want = x64 @ w64[_clamped(index, lead)].T
            err = _rel_err(got, want)
            assert err <= RTOL, (o, i, lead, index, err)


@needs_f32
def test_matvec_eager_python_indices():
    """Outside jit, with Python ints (and a NumPy int) as the indices."""
    rng = np.random.default_rng(1)
    x, w = _random(rng, (3, 20), jnp.float32), _random(rng, (4, 2, 9, 20), jnp.float32)
    got = native.matvec(x, w, (2, np.int32(1)))
    assert _rel_err(got, _f64(x) @ _f64(w)[2, 1].T) <= RTOL


# Indices out of range as lax.dynamic_slice takes them: a negative one counts from the end
# (-1 is the last entry), then it is clamped (the backward pass slices with lax too).
@needs_f32
@pytest.mark.parametrize("index", [3, 7, -4, -9, -1, -3])
def test_matvec_out_of_range_like_dynamic_slice(index):
    rng = np.random.default_rng(2)
    x, w = _random(rng, (2, 24), jnp.float32), _random(rng, (4, 6, 24), jnp.float32)
    got = _jit_matvec(1)(x, w, jnp.asarray([index], jnp.int32))
    m = jax.lax.dynamic_slice(w, (jnp.int32(index), 0, 0), (1, 6, 24))[0]
    assert _rel_err(got, _f64(x) @ _f64(m).T) <= RTOL


@needs_bf16
def test_matvec_uint16_bits_same_as_bfloat16():
    rng = np.random.default_rng(3)
    for o, i, lead in SHAPES:
        x = _random(rng, (5, i), jnp.bfloat16)
        w = _random(rng, (*lead, o, i), jnp.bfloat16)
        idx = jnp.asarray([n - 1 for n in lead], jnp.int32).reshape(len(lead))
        fn = _jit_matvec(len(lead))
        want = np.asarray(fn(x, w, idx))
        got = np.asarray(fn(_bits(x), _bits(w), idx))
        np.testing.assert_array_equal(got, want)
        assert np.any(want != 0)


@needs_f32
@pytest.mark.parametrize("index", [(1, 2), (0, 0), (5, 1)])  # (5, 1): the first is clamped
def test_matvec_gradient_equals_einsum(index):
    rng = np.random.default_rng(4)
    x, w = _random(rng, (3, 40), jnp.float32), _random(rng, (2, 3, 9, 40), jnp.float32)
    g = _random(rng, (3, 9), jnp.float32)  # the cotangent

    def native_loss(x, w, idx):
        return jnp.sum(native.matvec(x, w, (idx[0], idx[1])) * g)

    def einsum_loss(x, w, idx):
        m = jax.lax.dynamic_slice(w, (idx[0], idx[1], 0, 0), (1, 1, 9, 40))[0, 0]
        return jnp.sum(jnp.einsum("RI,OI->RO", x, m) * g)

    idx = jnp.asarray(index, jnp.int32)
    got = jax.jit(jax.grad(native_loss, argnums=(0, 1)))(x, w, idx)
    want = jax.jit(jax.grad(einsum_loss, argnums=(0, 1)))(x, w, idx)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert _rel_err(a, b) <= RTOL
    dw = np.array(got[1])
    clamped = _clamped(index, (2, 3))
    assert np.any(dw[clamped] != 0)  # the gradient lands on the chosen matrix only
    dw[clamped] = 0
    assert not np.any(dw)


def test_matvec_rejects_mismatches():
    """Checked before any kernel runs (no skip)."""
    x32, x16 = jnp.ones((2, 8), jnp.float32), jnp.ones((2, 8), jnp.bfloat16)
    w32 = jnp.ones((3, 5, 8), jnp.float32)
    with pytest.raises(ValueError, match="float32.*bfloat16|bfloat16.*float32"):
        native.matvec(x16, w32, (0,))
    with pytest.raises(ValueError, match="float32.*uint16|uint16.*float32"):
        native.matvec(x32, _bits(w32.astype(jnp.bfloat16)), (0,))
    with pytest.raises(ValueError):  # widths 8 and 7
        native.matvec(x32, jnp.ones((3, 5, 7), jnp.float32), (0,))
    with pytest.raises(ValueError):  # no index for the leading axis
        native.matvec(x32, w32, ())
    with pytest.raises(ValueError):  # one index too many
        native.matvec(x32, w32, (0, 0))
    with pytest.raises(ValueError):  # x not [R, I]
        native.matvec(jnp.ones((1, 2, 8), jnp.float32), w32, (0,))


# Stacked views and project.


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
    assert dense(w) is w
    assert isinstance(stacked(w)[jnp.int32(0)], Stacked)
    got = dense(stacked(w * jnp.arange(2.0)[:, None])[jnp.int32(1)])
    assert not isinstance(got, Stacked)
    np.testing.assert_array_equal(got, np.ones(3))


@needs_f32
@pytest.mark.parametrize("rows", [2, 8, 12])
def test_project_uses_kernel_up_to_max_rows(rows):
    """``project`` on a view: the einsum's values either way, the kernel only within
    ``native_kernels(True)`` and for at most ``MAX_ROWS`` rows."""
    rng = np.random.default_rng(rows)
    x = _random(rng, (rows // 2, 2, 24), jnp.float32)  # [B, T, D]
    w = _random(rng, (3, 10, 24), jnp.float32)  # [L, V, D]

    def fn(on: bool) -> Callable:
        def f(x, w, layer):
            with native_kernels(on):
                return project("BTD,VD->BTV", x, stacked(w)[layer])

        return jax.jit(f)

    want = np.einsum("btd,vd->btv", _f64(x), _f64(w)[2])
    for on in (False, True):
        got = fn(on)(x, w, jnp.int32(2))
        assert got.shape == (rows // 2, 2, 10)
        assert _rel_err(got, want) <= RTOL
        text = fn(on).lower(x, w, jnp.int32(2)).as_text()
        assert (native.TARGET in text) == (on and rows <= native.MAX_ROWS)


@needs_bf16
@pytest.mark.parametrize("rows", [12, 80])
def test_project_bfloat16_view_uses_kernel_at_any_rows(rows):
    """A bf16 view goes through the kernel at prefill sizes too (float32 stays with XLA's GEMM
    above ``MAX_ROWS``, the test above): the einsum's values, rounded to bf16."""
    rng = np.random.default_rng(rows)
    x = _random(rng, (rows // 2, 2, 40), jnp.bfloat16)  # [B, T, D]
    w = _random(rng, (3, 33, 40), jnp.bfloat16)  # [L, V, D]

    def f(x, w, layer):
        with native_kernels(True):
            return project("BTD,VD->BTV", x, stacked(w)[layer], jnp.float32)

    got = jax.jit(f)(x, w, jnp.int32(1))
    assert _rel_err(got, np.einsum("btd,vd->btv", _f64(x), _f64(w)[1])) <= RTOL
    assert native.TARGET in jax.jit(f).lower(x, w, jnp.int32(1)).as_text()


# The model, kernel on and off.

BATCH, PROMPT, SLOTS = 2, 5, 8
CONFIGS = [pytest.param(TINY_GROK2, id="grok2"), pytest.param(TINY_GROK1, id="grok1")]


@functools.cache
def _apply(config: GrokConfig, dtype: str, moe_impl: str, on: bool) -> Callable:
    """The jitted apply, one per (config, dtype, expert path, kernel on/off)."""
    fns = forward_fns(config, jnp.dtype(dtype), moe_impl, native_kernels_on=on)
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
    assert _rel_err(got.k, want.k) <= RTOL and _rel_err(got.v, want.v) <= RTOL
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
        assert _rel_err(on[i], off[i]) <= RTOL, ("prefill", "decode")[i // 2]
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
    assert _rel_err(on, off) <= RTOL
    _assert_caches_close(on_cache, off_cache)
    # And the same as the default ("auto") decode.
    _, _, auto, _ = _run(config, params, jnp.float32, False)
    assert _rel_err(on, auto) <= RTOL


@needs_f32
@pytest.mark.parametrize("config", CONFIGS)
def test_model_lowering_uses_kernel_only_when_on(config):
    params = _params(config, "float32")
    _, cache = _apply(config, "float32", "auto", False)(*_prefill_args(config, params, jnp.float32))
    args = _decode_args(config, params, cache)
    assert native.TARGET == "grok_matvec"
    assert "grok_matvec" in _apply(config, "float32", "auto", True).lower(*args).as_text()
    assert "grok_matvec" not in _apply(config, "float32", "auto", False).lower(*args).as_text()
    assert native.ATTENTION_TARGET == "grok_attention"
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
    err_native, err_xla = _rel_err(native_step, want), _rel_err(xla_step, want)
    assert err_native <= 1.5 * err_xla + 1e-3, (err_native, err_xla)
    assert err_xla < 0.05, err_xla  # bfloat16 rounding, not a broken model
    # The bfloat16 decode lowers to the kernel, too.
    _, cache = _apply(config, "bfloat16", "auto", False)(
        *_prefill_args(config, params, jnp.bfloat16)
    )
    text = _apply(config, "bfloat16", "auto", True).lower(*_decode_args(config, params, cache))
    assert "grok_matvec" in text.as_text()


# The fallbacks, each in a fresh interpreter (availability is decided once per process).

_CHILD = textwrap.dedent(
    """
    import json, warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import jax, jax.numpy as jnp, numpy as np
        from grok import native
        from grok.kv_cache import KVCache
        from grok.model import forward_fns
        from grok.presets import TINY_GROK2 as cfg
        from grok.rope import rope_table

        f32, bf16 = native.available(jnp.float32), native.available(jnp.bfloat16)
        why = native.why_unavailable()
        fns = forward_fns(cfg, jnp.dtype(jnp.float32))  # the default: the kernel if available
        one = jnp.zeros((1, 1), jnp.int32)
        rope = rope_table(cfg, 4)
        cache = KVCache.create(cfg, 1, 4, jnp.float32)
        shapes = jax.eval_shape(fns.init, jax.random.key(0), one, one, rope, None, one[0] + 1)
        rng = np.random.default_rng(0)
        params = jax.tree.map(
            lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes
        )
        args = (params, one + 3, one, rope, cache, one[0] + 1)  # a one-row step: kernel-sized
        logits, _ = jax.jit(fns.apply)(*args)
        text = jax.jit(fns.apply).lower(*args).as_text()
    print(json.dumps(dict(
        f32=f32,
        bf16=bf16,
        why=why,
        finite=bool(np.all(np.isfinite(np.asarray(logits)))),
        shape=list(logits.shape),
        kernel=native.TARGET in text,
        warnings=[str(w.message) for w in caught],
    )))
    """
)


def _child(env_changes: dict[str, str]) -> dict:
    """Runs ``_CHILD`` in a fresh interpreter with ``env_changes``; its JSON report."""
    env = dict(os.environ)
    env.pop(native.ENV_SWITCH, None)
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", **env_changes)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_fell_back(report: dict) -> None:
    assert report["f32"] is False and report["bf16"] is False
    assert report["finite"] and report["shape"] == [1, 1, TINY_GROK2.vocab_size]
    assert report["kernel"] is False


@pytest.mark.slow
def test_fallback_switched_off():
    report = _child({native.ENV_SWITCH: "0"})
    _assert_fell_back(report)
    assert "GROK_NATIVE" in report["why"]
    assert not [w for w in report["warnings"] if "grok.native" in w]  # asked for: no warning


@pytest.mark.slow
def test_fallback_without_compiler(tmp_path):
    build = tmp_path / "native-cache"
    report = _child({"CXX": "/nonexistent/c++", native.ENV_CACHE: str(build)})
    _assert_fell_back(report)
    assert "compiler" in report["why"] and "/nonexistent/c++" in report["why"]
    ours = [w for w in report["warnings"] if "grok.native" in w]
    assert len(ours) == 1 and "compiler" in ours[0], report["warnings"]
    assert not build.exists() or not list(build.glob("*.so"))


# The kernels must build where they cannot run too: a CPU without AVX-512 (or without
# AVX512-BF16) gets the library's own "no kernels" answer, not a compiler error (which once
# happened: the non-AVX-512 build referred to an ffi::Error that does not exist).
@pytest.mark.slow
@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("c++") is None,
    reason="needs an x86-64 C++ compiler",
)
@pytest.mark.parametrize(("march", "isa"), [("x86-64-v3", 0), ("skylake-avx512", 1)])
def test_kernels_build_for_other_cpus(tmp_path, march, isa):
    import ctypes
    from importlib import resources

    src = tmp_path / "kernels.cc"
    src.write_bytes(resources.files("grok.native").joinpath("kernels.cc").read_bytes())
    lib = tmp_path / f"lib-{march}.so"
    flags = ["-O1", f"-march={march}", "-std=c++17", "-shared", "-fPIC", "-w"]
    done = subprocess.run(
        ["c++", *flags, f"-I{jax.ffi.include_dir()}", str(src), "-o", str(lib)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    if isa == 0 or "avx512f" in Path("/proc/cpuinfo").read_text():  # loadable here
        assert ctypes.CDLL(str(lib)).grok_native_isa() == isa


# grouped_matvec: rows sorted by group, each times its group's matrix (the MoE's path).


def _grouped_reference(x, w, sizes) -> np.ndarray:
    """float64: row a times the matrix of its group; rows past the sizes' total are 0."""
    x, w = _f64(x), _f64(w)
    group = np.repeat(np.arange(len(sizes)), sizes)
    out = np.zeros((x.shape[0], w.shape[-2]))
    for a, g in enumerate(group):
        out[a] = x[a] @ w[g].T
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "sizes",
    [
        (1, 0, 1, 0),  # batch-1 decode: two experts of one row
        (3, 0, 9, 2),  # decode batch: few rows per group
        (20, 0, 33, 10),  # more than 8 rows per group: several passes of the row kernels
        (2, 0, 0, 1),  # fewer rows than x has: the rest come out 0
    ],
)
def test_grouped_matvec_matches_float64(dtype, sizes):
    rng = np.random.default_rng(7)
    rows = max(sum(sizes), 4)
    x = _random(rng, (rows, 100), dtype)
    w = _random(rng, (3, 4, 130, 100), dtype)  # [L, G, O, I]: odd widths for the tails
    sizes = jnp.asarray(sizes, jnp.int32)
    got = jax.jit(lambda x, w, s, layer: native.grouped_matvec(x, w, s, (layer,)))(
        x, w, sizes, jnp.int32(2)
    )
    want = _grouped_reference(x, w[2], np.asarray(sizes))
    assert _rel_err(got, want) <= RTOL
    assert not np.any(np.asarray(got)[int(sizes.sum()) :])


@needs_f32
def test_grouped_matvec_gradient():
    rng = np.random.default_rng(8)
    x, w = _random(rng, (5, 6), jnp.float32), _random(rng, (2, 3, 4, 6), jnp.float32)
    sizes = jnp.asarray([2, 0, 2], jnp.int32)  # row 4 belongs to no group

    def loss(x, w):
        return jnp.sum(native.grouped_matvec(x, w, sizes, (1,)) ** 2)

    def reference(x, w):
        group = jnp.asarray([0, 0, 2, 2])
        return jnp.sum(jnp.einsum("AI,AOI->AO", x[:4], w[1][group]) ** 2)

    got, want = jax.grad(loss, (0, 1))(x, w), jax.grad(reference, (0, 1))(x, w)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)


def test_grouped_matvec_rejects_mismatches():
    x = jnp.ones((4, 6), jnp.float32)
    w = jnp.ones((3, 5, 6), jnp.float32)
    with pytest.raises(ValueError, match="sizes"):
        native.grouped_matvec(x, w, jnp.ones((2,), jnp.int32))
    with pytest.raises(ValueError, match="grouped_matvec"):
        native.grouped_matvec(jnp.ones((4, 7), jnp.float32), w, jnp.ones((3,), jnp.int32))
    with pytest.raises(ValueError, match="x is bfloat16 and w float32"):
        native.grouped_matvec(x.astype(jnp.bfloat16), w, jnp.ones((3,), jnp.int32))


# The packed-panel path (64 rows and more in one product): row blocks of 12 with a tail,
# chunks of 256 rows, several input panels (128 float32 / 256 bfloat16 inputs each, packed by
# 16 x 16 transposes with masked tails) with an odd last input, and a last panel of fewer than
# 32 outputs (fewer than 16 too: 45 = 32 + 13).


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "o", "i"), [(64, 32, 256), (130, 130, 1031), (300, 45, 100)])
def test_matvec_panel_path_matches_float64(dtype, rows, o, i):
    rng = np.random.default_rng(9)
    x, w = _random(rng, (rows, i), dtype), _random(rng, (2, o, i), dtype)
    got = jax.jit(lambda x, w: native.matvec(x, w, (1,)))(x, w)
    assert _rel_err(got, _f64(x) @ _f64(w)[1].T) <= RTOL


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_matvec_panel_path_matches_float64(dtype):
    rng = np.random.default_rng(10)
    sizes = np.array([70, 0, 90, 5])  # two groups on the panel path, one on the row kernels
    x, w = _random(rng, (sizes.sum(), 77), dtype), _random(rng, (4, 40, 77), dtype)
    got = native.grouped_matvec(x, w, jnp.asarray(sizes, jnp.int32))
    assert _rel_err(got, _grouped_reference(x, w, sizes)) <= RTOL


def test_router_stored_in_bfloat16_reads_the_same_both_ways():
    """A tree cast whole to bf16 (router included, which the layers ask for as float32): the
    stacked loop once read the router's uint16 view as integers; both loops must now agree
    with each other and with the float32 model on the same rounded values."""
    cfg = TINY_GROK2
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), random_params(cfg, seed=4))
    upcast = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    rope = rope_table(cfg, 16)
    tokens = jnp.asarray([[3, 4, 5]], jnp.int32)
    positions = jnp.arange(3, dtype=jnp.int32)[None]
    lengths = jnp.asarray([3], jnp.int32)

    def logits(dtype, tree, on):
        apply = forward_fns(cfg, jnp.dtype(dtype), native_kernels_on=on).apply
        return np.asarray(apply(tree, tokens, positions, rope, None, lengths)[0], np.float64)

    want = logits(jnp.float32, upcast, False)
    xla = logits(jnp.bfloat16, params, False)
    assert _rel_err(xla, want) < 0.05
    if native.available(jnp.bfloat16):
        assert _rel_err(logits(jnp.bfloat16, params, True), xla) < 1e-3


def test_bench_kernels_script_reports_both_engines(capsys):
    """``scripts/bench_kernels.py`` on a tiny weight: one line per dtype and row count, with a
    positive rate for XLA and, where the kernels exist, for them."""
    import importlib.util

    path = REPO / "scripts" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", "40", "--in", "36", "--rows", "1", "3", "--repeats", "2"])
    lines = capsys.readouterr().out.strip().splitlines()[1:]
    assert len(lines) == 4
    for line in lines:
        xla = float(line.split("XLA")[1].split(",")[0])
        assert xla > 0
        if native.available(jnp.bfloat16):
            assert float(line.split("native")[1]) > 0
