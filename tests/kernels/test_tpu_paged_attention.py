"""The Pallas TPU paged-attention kernel (``grok.kernels.tpu.paged_attention``): in Pallas'
interpreter (any backend) against the float64 oracle, and compiled for a TPU topology where
libtpu is installed (no TPU needed: a compile-only topology).

The cases are the paged cache's (tests/kernels/test_paged.py): shuffled page tables, entries
that hold no page, a decode step, prompt pieces at an offset, G above a tile, no cap, tau > 1.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import reference_paged_attention
from test_paged import CASES, _config, _paged_inputs

from grok.attention import attention_temperature
from grok.kernels.tpu.paged_attention import paged_attention


def _run(case, dtype, seed, pages_per_step):
    config = _config(case)
    q, k, v, pages, positions, lengths = _paged_inputs(case, dtype, seed)
    tau = attention_temperature(positions, config.attn_temperature_len)
    got = paged_attention(
        q, k, v, jnp.int32(1), pages, tau, positions, lengths,
        scale=config.attn_scale, cap=config.attn_logit_softcapping,
        pages_per_step=pages_per_step, interpret=True,
    )  # fmt: skip
    want = reference_paged_attention(
        config, np.asarray(q, np.float32), np.asarray(k[1], np.float32),
        np.asarray(v[1], np.float32), pages, positions, lengths,
    )  # fmt: skip
    assert got.shape == q.shape and got.dtype == dtype
    return np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()


@pytest.mark.parametrize(
    "case, per_step",
    list(zip(CASES, (4, 1, 2), strict=True)),
    ids=["B{}T{}Z{}W{}".format(*c[:4]) for c in CASES],
)
def test_interpreted_kernel_matches_float64(case, per_step):
    """float32 within 1e-5 of the oracle; several pages per step (a step's pages past a row's
    length skipped, the table's end padded), and one."""
    err = _run(case, jnp.float32, 0, per_step)
    assert err <= 1e-5, err


def test_interpreted_kernel_in_bfloat16():
    # bfloat16 operands and output, float32 sums: the output's rounding (2^-8) and the
    # probabilities rounded to bfloat16 before the product with the values.
    assert _run(CASES[1], jnp.bfloat16, 0, 4) <= 1.2e-2


def test_compiles_for_a_tpu_topology(monkeypatch):
    """Compiled (not run) for one chip of a v5p slice from this host: decode and a prompt piece
    at Grok-2's head shape (8 kv heads of 128, G 8) in bfloat16, and float32."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (the 'tpu' extra): no TPU compiler here")
    # A compile-only topology holds no TPU: another process using libtpu must not block it.
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    topology = topologies.get_topology_desc("v5p:2x2x1", "tpu")
    mesh = jax.sharding.Mesh(np.array(topology.devices[:1]), ("x",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    for b, t, k, g, h, dtype in ((8, 1, 8, 8, 128, jnp.bfloat16), (2, 64, 8, 8, 128, jnp.bfloat16),
                                 (4, 1, 2, 4, 64, jnp.float32)):  # fmt: skip
        layers, pages, z, w = 2, 64, 16, 16
        args = (
            spec((b, t, k, g, h), dtype),
            spec((layers, pages, z, k, h), dtype),
            spec((layers, pages, z, k, h), dtype),
            spec((), jnp.int32),
            spec((b, w), jnp.int32),
            spec((b, t), jnp.float32),
            spec((b, t), jnp.int32),
            spec((b,), jnp.int32),
        )

        def attend(*a):
            return paged_attention(*a, scale=128**-0.5, cap=30.0)

        lowered = jax.jit(attend).lower(*args)
        assert "tpu_custom_call" in lowered.as_text()  # the Mosaic kernel, not a fallback
        compiled = lowered.compile()
        assert compiled.output_shardings is not None
