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


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (the CPU mesh of conftest)")
@pytest.mark.parametrize("mesh_shape", [None, (1, 2)], ids=["one-device", "kv-heads-split"])
def test_tpu_kernels_read_the_pool_through_the_kernel(mesh_shape):
    """``TpuKernels.paged_attend`` (the kernel interpreted; on a mesh each device its kv
    heads' pages, inside ``shard_map``) gives XLA's paged attention; its page-table width is
    one whole context (the kernel skips the pages past a row's length)."""
    from grok.kernels import XlaKernels
    from grok.kernels.tpu import TpuKernels
    from grok.kv_cache import LayerCache
    from grok.sharding import make_mesh

    case = CASES[0]  # 2 kv heads: one per device on the (1, 2) mesh
    config = _config(case)
    q, k, v, pages, positions, lengths = _paged_inputs(case, jnp.float32, 3)
    tau = attention_temperature(positions, config.attn_temperature_len)
    cache = LayerCache(k, v, jnp.int32(1), jnp.float32, pages)
    mesh = make_mesh(*mesh_shape) if mesh_shape else None
    tpu = TpuKernels(mesh=mesh, interpret=True)
    logits = {"scale": config.attn_scale, "cap": config.attn_logit_softcapping}
    got = jax.jit(lambda *a: tpu.paged_attend(*a, **logits))(q, cache, tau, positions, lengths)
    want = XlaKernels("cpu").paged_attend(q, cache, tau, positions, lengths, **logits)
    err = np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(np.asarray(want)).max()
    assert err <= 1e-5, err
    assert tpu.paged_width(3, 64, 16) == 64
