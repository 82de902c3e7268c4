"""The native CPU kernels' products (``grok.kernels.cpu.matvec`` and ``grouped_matvec``) and
the library's build; the model on them is tested in ``test_kernels.py``, the attention kernel
in ``test_native_attention.py``.

- ``matvec`` against a float64 numpy product, float32 and bfloat16, over row counts below, at
  and above ``MAX_ROWS`` (more passes), widths and heights with vector tails, one matrix big
  enough for the thread pool, zero to two stacked axes, traced indices and clamped ones;
  bfloat16's uint16 bits; its gradient; the ValueErrors it raises.
- ``grouped_matvec`` likewise, and the packed-panel path of both (64 rows and more).
- The fallbacks, in fresh interpreters: ``GROK_NATIVE=0`` and a missing compiler (the selector
  then picks the CPU path without kernel calls); the sources build for CPUs without AVX-512
  and without AVX512-BF16.

The kernel tests skip where ``cpu.available`` is False (no AVX-512, no compiler, ...).
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
from conftest import needs_bf16, needs_f32
from reference import rel_err

from grok.kernels import cpu
from grok.kernels.cpu import build
from grok.presets import TINY_GROK2

REPO = Path(__file__).resolve().parents[2]
RTOL = 1e-5  # of the largest |reference| entry


# Helpers.


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
        return cpu.matvec(x, w, tuple(idx[k] for k in range(lead)))

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
    assert cpu.MAX_ROWS == 8  # ROWS brackets it
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
            err = rel_err(got, want)
            assert err <= RTOL, (o, i, lead, index, err)


@needs_f32
def test_matvec_eager_python_indices():
    """Outside jit, with Python ints (and a NumPy int) as the indices."""
    rng = np.random.default_rng(1)
    x, w = _random(rng, (3, 20), jnp.float32), _random(rng, (4, 2, 9, 20), jnp.float32)
    got = cpu.matvec(x, w, (2, np.int32(1)))
    assert rel_err(got, _f64(x) @ _f64(w)[2, 1].T) <= RTOL


# Indices out of range as lax.dynamic_slice takes them: a negative one counts from the end
# (-1 is the last entry), then it is clamped (the backward pass slices with lax too).
@needs_f32
@pytest.mark.parametrize("index", [3, 7, -4, -9, -1, -3])
def test_matvec_out_of_range_like_dynamic_slice(index):
    rng = np.random.default_rng(2)
    x, w = _random(rng, (2, 24), jnp.float32), _random(rng, (4, 6, 24), jnp.float32)
    got = _jit_matvec(1)(x, w, jnp.asarray([index], jnp.int32))
    m = jax.lax.dynamic_slice(w, (jnp.int32(index), 0, 0), (1, 6, 24))[0]
    assert rel_err(got, _f64(x) @ _f64(m).T) <= RTOL


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
        return jnp.sum(cpu.matvec(x, w, (idx[0], idx[1])) * g)

    def einsum_loss(x, w, idx):
        m = jax.lax.dynamic_slice(w, (idx[0], idx[1], 0, 0), (1, 1, 9, 40))[0, 0]
        return jnp.sum(jnp.einsum("RI,OI->RO", x, m) * g)

    idx = jnp.asarray(index, jnp.int32)
    got = jax.jit(jax.grad(native_loss, argnums=(0, 1)))(x, w, idx)
    want = jax.jit(jax.grad(einsum_loss, argnums=(0, 1)))(x, w, idx)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel_err(a, b) <= RTOL
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
        cpu.matvec(x16, w32, (0,))
    with pytest.raises(ValueError, match="float32.*uint16|uint16.*float32"):
        cpu.matvec(x32, _bits(w32.astype(jnp.bfloat16)), (0,))
    with pytest.raises(ValueError):  # widths 8 and 7
        cpu.matvec(x32, jnp.ones((3, 5, 7), jnp.float32), (0,))
    with pytest.raises(ValueError):  # no index for the leading axis
        cpu.matvec(x32, w32, ())
    with pytest.raises(ValueError):  # one index too many
        cpu.matvec(x32, w32, (0, 0))
    with pytest.raises(ValueError):  # x not [R, I]
        cpu.matvec(jnp.ones((1, 2, 8), jnp.float32), w32, (0,))


# The fallbacks, each in a fresh interpreter (availability is decided once per process).

_CHILD = textwrap.dedent(
    """
    import json, warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import jax, jax.numpy as jnp, numpy as np
        from grok.kernels import cpu, select
        from grok.kv_cache import KVCache
        from grok.model import forward_fns
        from grok.presets import TINY_GROK2 as cfg
        from grok.rope import rope_table

        f32, bf16 = cpu.available(jnp.float32), cpu.available(jnp.bfloat16)
        why = cpu.why_unavailable()
        kernels = select(jnp.float32, devices=jax.devices()[:1])  # the kernel if available
        fns = forward_fns(cfg, jnp.dtype(jnp.float32), kernels=kernels)
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
        kernel=cpu.MATVEC_TARGET in text,
        kernels=repr(kernels),
        warnings=[str(w.message) for w in caught],
    )))
    """
)


def _child(env_changes: dict[str, str]) -> dict:
    """Runs ``_CHILD`` in a fresh interpreter with ``env_changes``; its JSON report."""
    env = dict(os.environ)
    env.pop(cpu.ENV_SWITCH, None)
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", **env_changes)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_fell_back(report: dict) -> None:
    assert report["f32"] is False and report["bf16"] is False
    assert report["finite"] and report["shape"] == [1, 1, TINY_GROK2.vocab_size]
    # The CPU views and bits stay (XLA:CPU needs them), without a kernel call.
    assert report["kernel"] is False
    assert report["kernels"] == "CpuKernels(platform='cpu', native=False)"


@pytest.mark.slow
def test_fallback_switched_off():
    report = _child({cpu.ENV_SWITCH: "0"})
    _assert_fell_back(report)
    assert "GROK_NATIVE" in report["why"]
    assert not [w for w in report["warnings"] if "grok.kernels" in w]  # asked for: no warning


@pytest.mark.slow
def test_fallback_without_compiler(tmp_path):
    cache = tmp_path / "native-cache"
    report = _child({"CXX": "/nonexistent/c++", cpu.ENV_CACHE: str(cache)})
    _assert_fell_back(report)
    assert "compiler" in report["why"] and "/nonexistent/c++" in report["why"]
    ours = [w for w in report["warnings"] if "grok.kernels" in w]
    assert len(ours) == 1 and "compiler" in ours[0], report["warnings"]
    assert not cache.exists() or not list(cache.glob("*.so"))


def test_library_is_kept_per_source():
    """The cache key covers every source file: editing one names another library."""
    files = build.sources()
    assert {"common.h", "isa.cc", "matvec.cc", "attention.cc"} <= set(files)
    key = build._cache_key("c++", files)
    assert build._cache_key("c++", files) == key
    edited = dict(files, **{"attention.cc": files["attention.cc"] + b"\n"})
    assert build._cache_key("c++", edited) != key


# The kernels must build where they cannot run too: a CPU without AVX-512 (or without
# AVX512-BF16; with it but without AVX512-VBMI, no quantised kernels) gets the library's own
# "no kernels" answer, not a compiler error (which once happened: the non-AVX-512 build
# referred to an ffi::Error that does not exist).
@pytest.mark.slow
@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("c++") is None,
    reason="needs an x86-64 C++ compiler",
)
@pytest.mark.parametrize(
    ("march", "isa"),
    [("x86-64-v3", 0), ("skylake-avx512", 1), ("cooperlake", 3)],
)
def test_kernels_build_for_other_cpus(tmp_path, march, isa):
    import ctypes

    lib = tmp_path / f"lib-{march}.so"
    # -O0: the test is whether each ISA's code compiles and reports its level (intrinsics
    # that need a missing feature fail at any level), not its speed: -O0 builds faster.
    flags = ("-O0", f"-march={march}", "-std=c++17", "-shared", "-fPIC", "-w")
    why = build.build_library("c++", build.sources(), lib, flags)
    assert why == "", why
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
    got = jax.jit(lambda x, w, s, layer: cpu.grouped_matvec(x, w, s, (layer,)))(
        x, w, sizes, jnp.int32(2)
    )
    want = _grouped_reference(x, w[2], np.asarray(sizes))
    assert rel_err(got, want) <= RTOL
    assert not np.any(np.asarray(got)[int(sizes.sum()) :])


@needs_f32
def test_grouped_matvec_gradient():
    rng = np.random.default_rng(8)
    x, w = _random(rng, (5, 6), jnp.float32), _random(rng, (2, 3, 4, 6), jnp.float32)
    sizes = jnp.asarray([2, 0, 2], jnp.int32)  # row 4 belongs to no group

    def loss(x, w):
        return jnp.sum(cpu.grouped_matvec(x, w, sizes, (1,)) ** 2)

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
        cpu.grouped_matvec(x, w, jnp.ones((2,), jnp.int32))
    with pytest.raises(ValueError, match="grouped_matvec"):
        cpu.grouped_matvec(jnp.ones((4, 7), jnp.float32), w, jnp.ones((3,), jnp.int32))
    with pytest.raises(ValueError, match="x is bfloat16 and w float32"):
        cpu.grouped_matvec(x.astype(jnp.bfloat16), w, jnp.ones((3,), jnp.int32))


# The packed-panel path (64 rows and more in one product): row blocks of 12 with a tail,
# chunks of 256 rows, several input panels (128 float32 / 256 bfloat16 inputs each, packed by
# 16 x 16 transposes with masked tails) with an odd last input, and a last panel of fewer than
# 32 outputs (fewer than 16 too: 45 = 32 + 13).


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "o", "i"), [(64, 32, 256), (130, 130, 1031), (300, 45, 100)])
def test_matvec_panel_path_matches_float64(dtype, rows, o, i):
    rng = np.random.default_rng(9)
    x, w = _random(rng, (rows, i), dtype), _random(rng, (2, o, i), dtype)
    got = jax.jit(lambda x, w: cpu.matvec(x, w, (1,)))(x, w)
    assert rel_err(got, _f64(x) @ _f64(w)[1].T) <= RTOL


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_matvec_panel_path_matches_float64(dtype):
    rng = np.random.default_rng(10)
    sizes = np.array([70, 0, 90, 5])  # two groups on the panel path, one on the row kernels
    x, w = _random(rng, (sizes.sum(), 77), dtype), _random(rng, (4, 40, 77), dtype)
    got = cpu.grouped_matvec(x, w, jnp.asarray(sizes, jnp.int32))
    assert rel_err(got, _grouped_reference(x, w, sizes)) <= RTOL


def test_bench_kernels_script_reports_both_engines(capsys):
    """``scripts/bench_kernels.py`` (``grok.bench.kernels``) on a tiny weight: one line per
    dtype and row count, with a positive rate for XLA and, where the kernels exist, for them
    (else the reason)."""
    from grok.bench.kernels import main

    main(["--out", "40", "--in", "36", "--rows", "1", "3", "--repeats", "2"])
    lines = capsys.readouterr().out.strip().splitlines()[1:]
    assert len(lines) == 4
    for line in lines:
        xla = float(line.split("XLA")[1].split(",")[0])
        assert xla > 0
        dtype = jnp.float32 if line.split()[0] == "float32" else jnp.bfloat16
        if cpu.available(dtype):
            assert float(line.split("native")[1]) > 0
        else:  # the script says why, in the same line
            assert "native unavailable" in line
