"""Test-suite setup: eight host (CPU) devices, so sharding tests can build real meshes, and
a fast compiler.

XLA reads its flags when the CPU backend starts, so they must be set before jax is imported;
single-device tests are unaffected by the device count (they use the first device).

The suite's tiny models spend far more time compiling than running, so the CPU backend's
LLVM optimisation level is 0: compiling takes about half the CPU time, and the programs
compute the same functions (no fast-math at either level; results differ from -O2 by float32
rounding, ~1e-7 on the tiny models' logits, far inside every tolerance here). A level given in
XLA_FLAGS is kept.
"""

import os
import tempfile

# The suite runs on the CPU backend, also where libtpu is installed (the tpu extra), which JAX
# would otherwise try to start a TPU with; a platform already set is kept. The TPU compiler
# still serves the tests that compile for a TPU topology (tests/test_tpu.py).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

# The command line keeps compiled programs in $XDG_CACHE_HOME/grok/jax (grok.compile_cache);
# the tests' runs write to a temporary directory, never the user's cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="grok-tests-cache-")

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from grok.kernels import cpu  # noqa: E402
from grok.model import forward_fns  # noqa: E402
from grok.rope import rope_table  # noqa: E402


def numpy_hf_tensors(config, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 released-name tensors without compiling Haiku's init (fast).

    Matrices ~ N(0, 1/in) (unit-scale activations), norms ~ 1 + N(0, 0.1^2) (never all ones,
    so a swapped norm shows), embedding/head ~ N(0, 1/D).
    """
    from grok.params import weight_specs

    rng = np.random.default_rng(seed)
    out = {}
    for spec in weight_specs(config):
        for _, name in spec.hf_names():
            shape = spec.hf_shape
            if len(shape) == 1:
                value = 1.0 + 0.1 * rng.standard_normal(shape)
            else:
                value = rng.standard_normal(shape) / np.sqrt(shape[1])
            out[name] = value.astype(np.float32)
    return out


@pytest.fixture(scope="session")
def hf_tensors():
    """``hf_tensors(config, seed)``: see ``numpy_hf_tensors``."""
    return numpy_hf_tensors


def random_params(config, seed: int = 0) -> dict:
    """Random float32 parameters shaped like the model's Haiku tree, without compiling its init.

    The tree comes from ``jax.eval_shape`` of the model's init; values are numpy draws: norms
    ~ 1 + N(0, 0.1^2), the embedding ~ N(0, 1), every other weight ~ N(0, 0.2^2). Cached per
    (config, seed): the arrays are shared by every test (jax arrays are immutable), the dicts
    holding them are fresh on each call.
    """
    return {module: dict(tensors) for module, tensors in _random_params(config, seed).items()}


@functools.lru_cache(maxsize=8)
def _random_params(config, seed: int) -> dict:
    fns = forward_fns(config, jnp.dtype(jnp.float32))
    one = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(
        fns.init, jax.random.key(0), one, one, rope_table(config, 1), None, jnp.ones(1, jnp.int32)
    )
    rng = np.random.default_rng(seed)
    params = {}
    for module, tensors in shapes.items():
        params[module] = {}
        for name, s in tensors.items():
            if "norm" in module:
                value = 1.0 + 0.1 * rng.standard_normal(s.shape)
            elif name == "embed_tokens":
                value = rng.standard_normal(s.shape)
            else:
                value = 0.2 * rng.standard_normal(s.shape)
            params[module][name] = jnp.asarray(value, jnp.float32)
    return params


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
