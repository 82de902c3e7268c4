"""Test-suite setup: eight host (CPU) devices, so sharding tests can build real meshes, and
a fast compiler.

XLA reads its flags when the CPU backend starts, so they must be set before jax is imported;
single-device tests are unaffected by the device count (they use the first device).

The suite's tiny models spend far more time compiling than running (2,800 XLA compiles, 330 s
of the CPU time on 2 cores), so the CPU backend compiles for speed of compiling: LLVM's
optimisation level is 0 (about half the CPU time), and fusions are emitted by XLA's elemental
emitter rather than its newer MLIR fusion emitters (``--xla_cpu_use_fusion_emitters=false``:
a tiny model's forward and decode compile in half the time, 3.0 -> 1.4 s). Both compute the
same functions (no fast-math either way; results differ from the defaults by float32
rounding, ~1e-7 on the tiny models' logits, far inside every tolerance here). A setting given
in XLA_FLAGS is kept.
"""

import os
import tempfile

# The suite runs on the CPU backend, also where libtpu is installed (the tpu extra), which JAX
# would otherwise try to start a TPU with; a platform already set is kept. The TPU compiler
# still serves the tests that compile for a TPU topology (tests/kernels/test_tpu.py).
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _with_flags(flags: str, *settings: str) -> str:
    """``flags`` plus each ``--name=value`` of ``settings`` whose name it does not set."""
    given = flags.split()
    missing = [s for s in settings if not any(g.startswith(s.split("=")[0]) for g in given)]
    return " ".join([*given, *missing])


# The compiler's speed settings (see above), for the tests' processes and for the ones they
# start (servers, multihost workers), which pass XLA_FLAGS=FAST_COMPILE_FLAGS beside their own
# device count.
_GIVEN = os.environ.get("XLA_FLAGS", "")
FAST_COMPILE_FLAGS = _with_flags(
    " ".join(f for f in _GIVEN.split() if "device_count" not in f),
    "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false",
)
os.environ["XLA_FLAGS"] = _with_flags(
    _GIVEN, "--xla_force_host_platform_device_count=8", *FAST_COMPILE_FLAGS.split()
)

# The command line keeps compiled programs in $XDG_CACHE_HOME/grok/jax (grok.compile_cache);
# the tests' runs write to a temporary directory, never the user's cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="grok-tests-cache-")
# The native CPU library (about 20 s of C++ compiling on 2 cores) is built once for the
# machine's test runs, not once per process: pytest-xdist's workers and the subprocesses the
# tests start would each build it again in their own cache. The library's file name is a hash
# of its sources, flags, compiler, jax and CPU, so a stale one is never loaded.
os.environ.setdefault(
    "GROK_NATIVE_CACHE", os.path.join(tempfile.gettempdir(), f"grok-tests-native-{os.getuid()}")
)

import functools  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

from grok import testing  # noqa: E402
from grok.kernels import cpu  # noqa: E402
from grok.testing import WeightScales, random_hf_tensors  # noqa: E402

# Random weights: grok.testing.random_params, the one maker of them (the tests', the
# benchmarks' and the checkpoints' alike). The tests' own scales: matrices 0.2 and the embedding
# 1 (large enough that every layer moves the residual stream), norms jittered around 1.
TEST_SCALES = WeightScales(matrix=0.2, embedding=1.0, norm_jitter=0.1)


@pytest.fixture(scope="session")
def hf_tensors():
    """``hf_tensors(config, seed)``: ``grok.testing.random_hf_tensors`` (released names,
    float32, fan-in scales)."""
    return random_hf_tensors


def random_params(config, seed: int = 0) -> dict:
    """``grok.testing.random_params`` in float32 with ``TEST_SCALES``, cached per (config,
    seed): the arrays are shared by every test (jax arrays are immutable), the dicts holding
    them are fresh on each call."""
    return {module: dict(tensors) for module, tensors in _random_params(config, seed).items()}


@functools.lru_cache(maxsize=8)
def _random_params(config, seed: int) -> dict:
    return testing.random_params(config, seed, scales=TEST_SCALES)


# The native kernels' tests (tests/test_native*.py): skip where a kernel does not exist here.
needs_f32 = pytest.mark.skipif(
    not cpu.available(jnp.float32), reason=f"no native kernel: {cpu.why_unavailable()}"
)
needs_bf16 = pytest.mark.skipif(
    not cpu.available(jnp.bfloat16),
    reason=f"no native bfloat16 kernel: {cpu.why_unavailable() or 'no AVX512-BF16'}",
)
NATIVE_DTYPES = [
    pytest.param(jnp.float32, marks=needs_f32, id="float32"),
    pytest.param(jnp.bfloat16, marks=needs_bf16, id="bfloat16"),
]


def check_lowering_ignores_host_backend(mesh, monkeypatch) -> None:
    """The tiny Grok-2's forward for ``mesh`` (a bf16 decode step and a prefill) lowers to the
    same program whatever ``jax.default_backend`` answers (the kernels follow the mesh's
    devices), and to another program than XLA's reference for TPUs (the check can see a
    difference)."""
    import jax

    from grok.kernels import XlaKernels, select
    from grok.kv_cache import KVCache
    from grok.model import forward_fns, init_params
    from grok.presets import TINY_GROK2
    from grok.rope import rope_table
    from grok.sharding import activation_sharding

    cfg, dt = TINY_GROK2, jnp.dtype(jnp.bfloat16)
    params = jax.eval_shape(lambda: init_params(cfg, 0, dt))
    rope = jax.eval_shape(lambda: rope_table(cfg, 16))
    cache = jax.eval_shape(lambda: KVCache.create(cfg, 2, 16, dt))
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)

    def lowered(kernels) -> list[str]:
        forward_fns.cache_clear()  # a new apply: nothing traced before is reused
        fns = forward_fns(cfg, dt, "auto", None, activation_sharding(mesh), kernels)
        texts = []
        for t in (1, 8):  # a decode step and a prefill
            tokens = jax.ShapeDtypeStruct((2, t), jnp.int32)
            args = (params, tokens, tokens, rope, cache, lengths)
            texts.append(jax.jit(fns.apply).lower(*args).as_text())
        return texts

    try:
        host = lowered(select(dt, mesh=mesh))
        monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
        assert lowered(select(dt, mesh=mesh)) == host
        monkeypatch.undo()
        assert lowered(XlaKernels("tpu")) != host
    finally:
        forward_fns.cache_clear()


def attention_config(kv_heads: int, group: int, head_dim: int, cap, temperature_len):
    """The tiny Grok-2 with an attention of ``kv_heads`` x ``group`` query heads of
    ``head_dim``, soft cap ``cap`` and temperature length ``temperature_len`` (None: off):
    what the attention kernels' tests vary."""
    import dataclasses

    from grok.presets import TINY_GROK2

    return dataclasses.replace(
        TINY_GROK2,
        num_attention_heads=kv_heads * group,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        attn_logit_softcapping=cap,
        attn_temperature_len=temperature_len,
    )


def quantised_params(config, params: dict, mode: str) -> tuple[dict, dict]:
    """(``params`` with every matrix of ``config``'s weight table quantised in ``mode`` (codes,
    and ``name + "_scale"``), the same values dequantised to float32 as plain parameters)."""
    import jax
    import numpy as np

    from grok.params import weight_specs
    from grok.quant import dequantize, quantize

    quant = {m: dict(leaves) for m, leaves in params.items()}
    exact = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    for spec in weight_specs(config):
        if spec.quantized:
            w = np.asarray(params[spec.module][spec.name], np.float32)
            q, scale = quantize(w, mode, spec.in_dims)
            quant[spec.module][spec.name] = jnp.asarray(q)
            quant[spec.module][spec.name + "_scale"] = jnp.asarray(scale)
            exact[spec.module][spec.name] = jnp.asarray(dequantize(q, scale))
    return quant, exact
