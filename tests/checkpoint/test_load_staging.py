"""Loading through reused host buffers, the path accelerators take (``HostBuffers``).

On the CPU backend ``device_put`` adopts a page-aligned shard buffer as the array, so the
loader gives every shard fresh memory. Everywhere else a shard is copied to its device and
the loader reuses a ring of one or two host buffers. These tests force that path on the
8-device CPU mesh (``grok.checkpoint.staging.stages_on_host`` patched), with ``device_put``
copying numpy input as a transfer to an accelerator does (XLA:CPU aliases an aligned numpy
buffer even when asked not to): a buffer handed out again while still in use would show up
as parameters that differ from the ordinary load's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_fp8 import write_fp8_checkpoint

from grok.api import load_pretrained
from grok.checkpoint import fp8, plan_load, staging
from grok.errors import CheckpointError
from grok.presets import TINY_GROK2
from grok.sharding import make_mesh
from grok.testing import write_checkpoint

CONFIG = TINY_GROK2.replace(num_attention_heads=8, head_dim=8, num_key_value_heads=2)
W1 = "model.layers.1.block_sparse_moe.experts.3.w1.weight"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, hf_tensors):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), CONFIG, hf_tensors(CONFIG), tp=8)


def host_params(path, **kwargs):
    model = load_pretrained(path, quiet=True, **kwargs)
    return jax.tree_util.tree_map(np.asarray, model.params)


def assert_same_bits(got, want):
    for (path, x), (_, y) in zip(
        jax.tree_util.tree_leaves_with_path(want),
        jax.tree_util.tree_leaves_with_path(got),
        strict=True,
    ):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        np.testing.assert_array_equal(
            x.view(f"u{x.dtype.itemsize}"), y.view(f"u{y.dtype.itemsize}"), err_msg=str(path)
        )


@pytest.fixture
def staged(monkeypatch):
    """Forces staging; ``staged.count`` sets the ring size; records every buffer allocated."""

    class Staged:
        count = None
        allocations = []
        rings = []

    real_buffers, real_empty = staging.HostBuffers, staging.aligned_empty

    def buffers(staged, count=2):
        ring = real_buffers(staged, Staged.count or count)
        Staged.rings.append(ring)
        return ring

    def empty(shape, dtype):
        Staged.allocations.append(shape)
        return real_empty(shape, dtype)

    def copying_device_put(x, device=None, **kwargs):  # an accelerator's transfer copies
        return real_device_put(np.array(x) if isinstance(x, np.ndarray) else x, device, **kwargs)

    real_device_put = jax.device_put
    monkeypatch.setattr(jax, "device_put", copying_device_put)
    monkeypatch.setattr(staging, "stages_on_host", lambda device: True)
    monkeypatch.setattr(staging, "HostBuffers", buffers)
    monkeypatch.setattr(staging, "aligned_empty", empty)
    return Staged


@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("mesh_shape", [None, (1, 8), (2, 4)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_staged_load_equals_the_ordinary_load(ckpt, staged, monkeypatch, count, mesh_shape, dtype):
    mesh = make_mesh(*mesh_shape) if mesh_shape else None
    staged.count = count
    got = host_params(ckpt, dtype=dtype, mesh=mesh)
    ring = next(r for r in staged.rings if r.staged)
    assert ring.window == count
    allocations = len(staged.allocations)
    monkeypatch.undo()
    want = load_pretrained(ckpt, dtype=dtype, mesh=mesh, quiet=True).params
    shards = sum(
        len({str(s.index) for s in a.addressable_shards}) for a in jax.tree_util.tree_leaves(want)
    )
    # The ring is reused: fewer buffers than shards read (a shard bigger than any before it
    # needs a bigger buffer, so not exactly ``count``).
    assert 1 <= allocations < shards
    assert_same_bits(got, jax.tree_util.tree_map(np.asarray, want))


def test_second_buffer_only_within_five_percent_of_the_checkpoint(ckpt, staged):
    """Two buffers (reads overlapping transfers) where the largest shard is at most 5% of
    the checkpoint's bytes; one otherwise, keeping host memory within the target."""
    size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    for mesh_shape in (None, (1, 8)):
        mesh = make_mesh(*mesh_shape) if mesh_shape else None
        staged.rings.clear()
        model = load_pretrained(ckpt, dtype=jnp.float32, mesh=mesh, quiet=True)
        largest = max(
            s.data.nbytes
            for a in jax.tree_util.tree_leaves(model.params)
            for s in a.addressable_shards
        )
        ring = next(r for r in staged.rings if r.staged)
        assert ring.window == (2 if largest <= 0.05 * size else 1), (mesh_shape, largest, size)


def test_staged_fp8_matches_the_ordinary_load(tmp_path, hf_tensors, staged, monkeypatch):
    """FP8 codes staged and dequantised on the device, as on an accelerator, whole and a layer
    at a time, plain and quantised again: the same bits as the ordinary CPU load."""
    config = CONFIG.replace(num_hidden_layers=2)
    write_fp8_checkpoint(tmp_path, config, hf_tensors(config, 4), "block")
    monkeypatch.setattr(fp8, "on_device", lambda *args: True)
    kinds = ({"dtype": jnp.bfloat16}, {"dtype": jnp.bfloat16, "mesh": make_mesh(1, 8)})
    kinds += ({"dtype": jnp.bfloat16, "quantize": "fp8"},)
    got = [host_params(tmp_path, **kw) for kw in kinds]
    assert any(r.staged for r in staged.rings)
    monkeypatch.undo()
    for g, kw in zip(got, kinds, strict=True):
        assert_same_bits(g, host_params(tmp_path, **kw))


def test_staged_load_refuses_a_non_finite_weight(tmp_path, hf_tensors, staged):
    tensors = hf_tensors(CONFIG)
    tensors[W1] = tensors[W1].copy()
    tensors[W1][1, 2] = np.inf
    path = write_checkpoint(tmp_path / "bad", CONFIG, tensors, tp=8)
    with pytest.raises(CheckpointError, match=rf"{W1}.*non-finite"):
        load_pretrained(path, dtype=jnp.float32, mesh=make_mesh(1, 8), quiet=True)
    assert any(r.staged for r in staged.rings)


def test_cpu_backend_adopts_fresh_buffers(ckpt):
    """The CPU backend's own path: no ring, each shard its own new memory (the array itself)."""
    device = jax.devices()[0]
    assert device.platform == "cpu" and not staging.stages_on_host(device)
    size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    buffers = staging.host_buffers(plan_load(CONFIG, dtype=jnp.float32), size)
    assert not buffers.staged and buffers.window == 2
    a, slot = buffers.take((4, 8), np.dtype(np.float32))
    b, _ = buffers.take((4, 8), np.dtype(np.float32))
    assert slot is None and not np.shares_memory(a, b)
