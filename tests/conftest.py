"""Test-suite setup: eight host (CPU) devices, so sharding tests can build real meshes.

XLA reads the flag when the CPU backend starts, so it must be set before jax is imported;
single-device tests are unaffected (they use the first device).
"""

import os
import tempfile

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

# The command line keeps compiled programs in $XDG_CACHE_HOME/grok/jax (grok.compile_cache);
# the tests' runs write to a temporary directory, never the user's cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="grok-tests-cache-")

import numpy as np  # noqa: E402  (after the flag: numpy does not start XLA, but keep order)
import pytest  # noqa: E402


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
