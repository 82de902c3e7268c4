"""Sharded loading on an 8-device CPU mesh (tests/conftest.py sets the device count).

The test config has N = 8 query heads and K = 2 kv heads, so a model axis of 4 or 8 also
exercises the kv-head replication rule on real devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from grok.api import load_pretrained
from grok.checkpoint import units
from grok.errors import MemoryPlanError, ShardingError
from grok.memory_plan import plan_memory
from grok.params import weight_specs
from grok.presets import GROK2, TINY_GROK2
from grok.sharding import (
    ShardingRules,
    kv_cache_sharding,
    kv_cache_spec,
    make_mesh,
    mesh_sizes,
    param_partition_specs,
)
from grok.testing import write_checkpoint

CONFIG = TINY_GROK2.replace(num_attention_heads=8, head_dim=8, num_key_value_heads=2)
TOKENS = np.array([[3, 17, 255, 0, 42, 9], [7, 7, 100, 200, 1, 64]], np.int32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, hf_tensors):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), CONFIG, hf_tensors(CONFIG), tp=8)


@pytest.fixture(scope="module")
def single_logits(ckpt):
    model = load_pretrained(ckpt, dtype=jnp.float32, quiet=True)
    return np.asarray(model.logits(TOKENS))


def test_eight_devices():
    assert len(jax.devices()) == 8


@pytest.mark.parametrize("shape", [(1, 8), (2, 4), (8, 1)])
def test_sharded_logits_equal_single_device(ckpt, single_logits, shape):
    mesh = make_mesh(*shape)
    model = load_pretrained(ckpt, dtype=jnp.float32, mesh=mesh, quiet=True)
    specs = param_partition_specs(CONFIG, mesh_sizes(mesh))
    for module, names in specs.items():
        for name, pspec in names.items():
            array = model.params[module][name]
            assert array.sharding.spec == pspec, (module, name)
            assert array.sharding.mesh.shape == mesh.shape
    got = np.asarray(model.logits(TOKENS))
    rel = np.max(np.abs(got - single_logits)) / np.max(np.abs(single_logits))
    assert rel < 1e-5, rel


def test_rules_on_the_8_device_mesh():
    specs = param_partition_specs(CONFIG, {"data": 2, "model": 4})
    attn = specs["grok/layers/layer/attn"]
    assert attn["q_proj"] == P(None, "model", None, None)  # [L, N, H, D]
    assert attn["o_proj"] == P(None, None, "model", None)  # [L, D, N, H]
    assert attn["k_proj"] == P(None, None, None, None)  # K = 2 < 4: replicated
    moe = specs["grok/experts"]
    assert moe["w1"] == P(None, None, "model", None)  # [L, E, Fe, D]
    assert moe["w2"] == P(None, None, None, "model")  # [L, E, D, Fe]
    assert specs["grok/layers/layer/moe"]["router"] == P(None, None, None)
    assert specs["grok"]["embed_tokens"] == P("model", None)
    assert specs["grok/layers/layer/mlp"]["down_proj"] == P(None, None, "model")


@pytest.mark.parametrize("model_axis", [1, 2, 4, 8, 16])
def test_grok2_rules_for_every_model_axis(model_axis):
    """Grok-2 has K = 8: split up to 8-way, replicated at 16 (no device needed)."""
    specs = param_partition_specs(GROK2, {"data": 1, "model": model_axis})
    attn = specs["grok/layers/layer/attn"]
    split = "model" if model_axis > 1 else None
    assert attn["q_proj"] == P(None, split, None, None)
    kv = split if model_axis <= 8 else None
    assert attn["k_proj"] == P(None, kv, None, None)
    assert attn["v_proj"] == P(None, kv, None, None)
    assert specs["grok/experts"]["w1"] == P(None, None, split, None)
    # The KV cache [L, B, S, K, H] follows the k/v projections by the same rule.
    assert kv_cache_spec(GROK2, {"data": 1, "model": model_axis}, 1, 8) == P(
        None, None, None, kv, None
    )


def test_kv_replication_gives_the_same_attention():
    """With K < model, every model shard holds all K heads; query head n still reads n // G."""
    n, k, model = 8, 2, 4
    g = n // k
    rng = np.random.default_rng(0)
    q = rng.standard_normal((n, 4))
    kv = rng.standard_normal((k, 4))
    full = np.einsum("nh,nh->n", q, kv[np.arange(n) // g])
    shards = []
    for r in range(model):  # shard r holds query heads [r * n/model, (r+1) * n/model)
        heads = np.arange(r * n // model, (r + 1) * n // model)
        shards.append(np.einsum("nh,nh->n", q[heads], kv[heads // g]))  # replicated kv
    np.testing.assert_array_equal(np.concatenate(shards), full)


def test_indivisible_dimension_is_an_error_before_reading(tmp_path):
    bad = CONFIG.replace(num_attention_heads=4, head_dim=16)  # N = 4 on a model axis of 8
    bad.save(tmp_path / "config.json")  # no weights at all: nothing may be read
    with pytest.raises(ShardingError, match="heads.*size 4.*size 8"):
        load_pretrained(tmp_path, mesh=make_mesh(1, 8), quiet=True)


def test_collision_is_refused():
    rules = ShardingRules({**ShardingRules().table, "embed": "model"})
    with pytest.raises(ShardingError, match="both map to mesh axis 'model'"):
        param_partition_specs(CONFIG, {"data": 1, "model": 2}, rules)


def test_memory_plan_matches_the_arrays(ckpt):
    mesh = make_mesh(2, 4)
    plan = plan_memory(CONFIG, {"data": 2, "model": 4}, dtype=jnp.float32)
    model = load_pretrained(ckpt, dtype=jnp.float32, mesh=mesh, quiet=True)
    dev = mesh.devices.flat[0]
    on_dev = sum(
        s.data.nbytes
        for a in jax.tree_util.tree_leaves(model.params)
        for s in a.addressable_shards
        if s.device == dev
    )
    assert plan.weights == on_dev
    with pytest.raises(MemoryPlanError, match="needs"):
        load_pretrained(ckpt, mesh=mesh, device_memory_bytes=on_dev // 2, quiet=True)


def test_grok2_plan_on_8_by_80gb():
    plan = plan_memory(GROK2, {"data": 1, "model": 8}, batch=1, context=131072)
    total_params = sum(int(np.prod(s.shape)) for s in weight_specs(GROK2))
    assert total_params == 269_515_497_472
    # Everything but norms, router and nothing else is split 8 ways; bf16 is 2 bytes.
    assert 2 * total_params / 8 <= plan.weights < 2 * total_params / 8 * 1.01
    assert plan.kv_cache == 32 * (1 << 30) // 8  # 32 GiB per sequence, K split 8-way
    fp8 = plan_memory(GROK2, {"data": 1, "model": 8}, quantize="fp8")
    assert fp8.weights < 0.52 * plan.weights


def test_each_distinct_shard_is_read_once(ckpt, monkeypatch):
    """Replicas over "data" share one read; only addressable devices are asked for."""
    reads = []
    real = units.shard_units

    def recording(files, scales, spec, index, itemsize):
        reads.append(spec.name)
        return real(files, scales, spec, index, itemsize)

    monkeypatch.setattr(units, "shard_units", recording)
    load_pretrained(ckpt, dtype=jnp.float32, mesh=make_mesh(4, 2), quiet=True)
    assert reads.count("w1") == 2  # Fe over model = 2: two distinct shards, each read once
    assert reads.count("k_proj") == 2  # K = 2 over model = 2
    assert reads.count("router") == 1  # replicated everywhere: read once


def test_make_mesh_takes_the_first_devices():
    mesh = make_mesh(1, 4)
    assert mesh.devices.shape == (1, 4)
    assert list(mesh.devices.flat) == jax.devices()[:4]
    with pytest.raises(ShardingError, match="needs 16 devices, found 8"):
        make_mesh(2, 8)


@pytest.mark.parametrize("kind", ["jax-explicit", "jax-auto", "mesh-subset", "grok-1x4"])
def test_any_mesh_works(ckpt, single_logits, kind):
    """jax.make_mesh (Explicit axes by default), Mesh(...) over a device subset, make_mesh."""
    if kind == "jax-explicit":
        mesh = jax.make_mesh((2, 4), ("data", "model"))
        assert AxisType.Explicit in mesh.axis_types
    elif kind == "jax-auto":
        mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    elif kind == "mesh-subset":
        mesh = Mesh(np.array(jax.devices()[4:8]).reshape(2, 2), ("data", "model"))
    else:
        mesh = make_mesh(1, 4)
    model = load_pretrained(ckpt, dtype=jnp.float32, mesh=mesh, quiet=True)
    leaf = model.params["grok/experts"]["w1"]
    assert set(leaf.sharding.device_set) == set(mesh.devices.flat)
    got = np.asarray(model.logits(TOKENS))
    np.testing.assert_allclose(got, single_logits, rtol=1e-5, atol=1e-5 * np.abs(got).max())


def test_kv_cache_sharding_follows_the_kv_heads():
    # K = 2: split over a model axis of 2, replicated over 4 (as the k/v projections are).
    spec = P(None, "data", None, "model", None)
    assert kv_cache_sharding(make_mesh(4, 2), CONFIG, 8).spec == spec
    assert kv_cache_sharding(make_mesh(2, 4), CONFIG, 8).spec == P(None, "data", None, None, None)
    assert kv_cache_sharding(make_mesh(2, 4), CONFIG, 3).spec == P(None, None, None, None, None)


def test_generation_on_a_mesh_equals_one_device(ckpt):
    from grok.sampling import Sampler

    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
    kwargs = {"max_new_tokens": 6, "sampler": Sampler(temperature=1.0), "seed": 3}
    one = load_pretrained(ckpt, dtype=jnp.float32, quiet=True).generate(prompts, **kwargs)
    sharded = load_pretrained(ckpt, dtype=jnp.float32, mesh=make_mesh(4, 2), quiet=True)
    assert sharded.generate(prompts, **kwargs).tokens == one.tokens


def test_activations_are_pinned_at_block_boundaries(ckpt):
    model = load_pretrained(ckpt, dtype=jnp.float32, mesh=make_mesh(4, 2), quiet=True)
    tokens = jnp.zeros((4, 8), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (4, 8))
    lengths = jnp.full((4,), 8, jnp.int32)
    text = model._apply.lower(model.params, tokens, positions, model.rope, None, lengths).as_text()
    assert text.count("sharding_constraint") >= 2  # after the embedding and each layer
    single = load_pretrained(ckpt, dtype=jnp.float32, quiet=True)
    text = single._apply.lower(single.params, tokens, positions, single.rope, None, lengths)
    assert "sharding_constraint" not in text.as_text()
