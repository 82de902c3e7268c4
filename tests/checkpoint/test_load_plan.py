"""The load plan (``grok.checkpoint.plan``): decided once before a byte is read, and the
reader builds what it says, its copy units filling every shard exactly once."""

import collections
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_fp8 import write_fp8_checkpoint

import grok
from grok.checkpoint import ReleasedCheckpoint, hf_to_params, load, plan_load, units
from grok.checkpoint.plan import shards_of
from grok.errors import MemoryPlanError, ShardingError
from grok.params import weight_specs
from grok.presets import TINY_GROK2
from grok.sharding import ShardingRules, make_mesh, place_weights
from grok.testing import write_checkpoint

CONFIG = TINY_GROK2.replace(num_attention_heads=8, head_dim=8, num_key_value_heads=2)
# Heads whole and head_dim split: a device shard slices an inner axis of o_proj's input
# ([D, N, H]: N whole, H in part), so its units read the covering columns and slice them.
HEAD_DIM_RULES = ShardingRules(
    {**ShardingRules().table, "heads": None, "kv_heads": None, "head_dim": "model"}
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, hf_tensors):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), CONFIG, hf_tensors(CONFIG), tp=8)


def test_plan_refuses_a_mesh_or_a_cache_without_any_file():
    with pytest.raises(ShardingError, match="heads.*size 4.*size 8"):
        plan_load(CONFIG.replace(num_attention_heads=4, head_dim=16), make_mesh(1, 8))
    with pytest.raises(MemoryPlanError, match="KV cache batch"):
        plan_load(CONFIG, make_mesh(1, 8), kv_batch=-1)


def test_a_load_builds_its_plan_once(ckpt):
    """The weight table, its placement on the mesh and each parameter's shard map are
    computed once per load (the sharding check, the memory plan and the reader each built
    their own before), a layer's shard map once more for each parameter built by layers."""
    watched = {f.__code__: f.__name__ for f in (weight_specs, place_weights, shards_of)}
    calls = collections.Counter()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in watched:
            calls[watched[frame.f_code]] += 1

    sys.setprofile(profile)
    try:
        load(ckpt, dtype=jnp.float32, mesh=make_mesh(2, 4), quantize="fp8", quiet=True)
    finally:
        sys.setprofile(None)
    specs = weight_specs(CONFIG)
    layered = sum(spec.quantized for spec in specs)
    assert calls == {"weight_specs": 1, "place_weights": 1, "shards_of": len(specs) + layered}


def _holds(value, prefix: str, depth: int = 3) -> bool:
    """Whether ``value`` is, or holds (in a container or an attribute, ``depth`` levels
    down), a path naming ``prefix`` or something below it."""
    if isinstance(value, str | os.PathLike):
        return os.fspath(value).startswith(prefix)
    if depth == 0 or isinstance(value, np.ndarray | jax.Array):
        return False
    if isinstance(value, dict):
        value = list(value.values())
    elif not isinstance(value, list | tuple):
        value = list(getattr(value, "__dict__", {}).values())
    return any(_holds(v, prefix, depth - 1) for v in value)


def test_the_path_reaches_few_functions_and_never_comes_back(ckpt):
    """``load_pretrained(path)``: the path (or a file below it) is handed to at most 20
    calls in grok/, the directory itself to 6 functions, each file to one read of its
    header; and no call returns it (it is resolved once, and tensors name their file
    within the directory that ``CheckpointFiles`` alone holds)."""
    package = os.path.dirname(grok.__file__)
    prefix = os.fspath(ckpt)
    stays, returned, stack = [], [], []

    def profile(frame, event, arg):
        code = frame.f_code
        if event not in ("call", "return") or not code.co_filename.startswith(package):
            return
        if event == "call":
            names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
            held = [
                frame.f_locals.get(n) for n in names if _holds(frame.f_locals.get(n), prefix, 0)
            ]
            stack.append(bool(held))
            if held:
                stays.append((code.co_qualname, os.fspath(held[0])))
        elif stack.pop() and _holds(arg, prefix):
            returned.append(code.co_qualname)

    grok.load_pretrained(ckpt, dtype=jnp.float32, quiet=True)  # imports and compiles first
    sys.setprofile(profile)
    try:
        grok.load_pretrained(ckpt, dtype=jnp.float32, quiet=True)
    finally:
        sys.setprofile(None)
    files = sorted(str(p) for p in ckpt.glob("*.safetensors"))
    on_files = sorted(path for name, path in stays if path.endswith(".safetensors"))
    on_directory = {name for name, path in stays if path.rstrip("/") == prefix}
    assert len(stays) <= 20 and returned == [], (stays, returned)
    assert on_files == files and len(on_directory) <= 6, (on_files, on_directory)


def _region(index, shape):
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


@pytest.mark.parametrize("kind", ["float32", "quantize", "fp8-block"])
@pytest.mark.parametrize("mesh_shape", [None, (2, 4)])
def test_the_reader_builds_what_the_plan_says(ckpt, tmp_path, hf_tensors, kind, mesh_shape):
    """Each array has the plan's sharding and dtype and this process's shards, and the
    progress reported adds up to the plan's total, on every route (host, FP8 codes
    dequantised on the device, quantised a layer at a time)."""
    path, quantize = ckpt, "fp8" if kind == "quantize" else None
    if kind == "fp8-block":
        path = tmp_path
        write_fp8_checkpoint(path, CONFIG, hf_tensors(CONFIG, 1), "block")
    mesh = make_mesh(*mesh_shape) if mesh_shape else None
    plan = plan_load(CONFIG, mesh, dtype=jnp.bfloat16, quantize=quantize)
    done = []
    with ReleasedCheckpoint(path, CONFIG) as released:
        params = released.read(plan, on_bytes=done.append)
    assert sum(done) == plan.read_bytes
    for param in plan.params:
        array = params[param.spec.module][param.spec.name]
        assert array.sharding == param.sharding, param.spec.name
        assert array.dtype == (jnp.float8_e4m3fn if param.quantized else param.dtype)
        built = {_region(s.index, array.shape) for s in array.addressable_shards}
        assert built == {_region(s.index, array.shape) for s in param.shards}, param.spec.name
        if param.quantized:
            scale = params[param.spec.module][param.spec.name + "_scale"]
            assert scale.sharding == param.scale_sharding


def _fill(unit, hits: np.ndarray) -> bool:
    """Adds 1 where ``unit`` writes into ``hits`` (a shard buffer's shape), checking each
    part's rectangle against its TP slice and its place; returns whether it gathers."""
    dst = hits[unit.pos]
    target = np.zeros(unit.gather.region, np.int32) if unit.gather else dst.reshape(unit.view)
    for part in unit.parts:
        n = part.rows.stop - part.rows.start
        if part.cols is None:  # a flat range of a 1-D tensor
            assert part.rows.stop <= math.prod(part.entry.shape)
            want = (n,)
        else:
            assert part.rows.stop <= part.entry.shape[0]
            assert part.cols.stop <= part.entry.shape[1]
            want = (n, part.cols.stop - part.cols.start)
        assert target[part.dst].shape == want, part
        target[part.dst] += 1
    if unit.gather is None:
        return False
    assert np.all(target == 1)
    dst[...] += target.reshape(unit.gather.shape)[unit.gather.post]
    return True


@pytest.mark.parametrize(
    ("mesh_shape", "rules"),
    [(None, None), ((1, 8), None), ((2, 4), None), ((1, 2), HEAD_DIM_RULES)],
)
def test_copy_units_fill_every_shard_exactly_once(ckpt, monkeypatch, mesh_shape, rules):
    """With units of at most 1 KiB (so row blocks split every tensor here): every element of
    every shard buffer is written by exactly one part of one unit, each part's source lies
    in its TP slice and matches its place, and a unit of whole rows stays within the size
    unless one row is bigger."""
    monkeypatch.setattr(units, "UNIT_BYTES", 1024)
    mesh = make_mesh(*mesh_shape) if mesh_shape else None
    plan = plan_load(CONFIG, mesh, dtype=jnp.float32, rules=rules)
    gathered, split = 0, 0
    with ReleasedCheckpoint(ckpt, CONFIG) as released:
        for param in plan.params:
            for shard in param.shards:
                hits = np.zeros(shard.shape, np.int32)
                found = units.shard_units(
                    released.files, released.scales, param.spec, shard.index, 4
                )
                for unit in found:
                    if _fill(unit, hits):
                        gathered += 1
                        continue
                    view = np.empty(shard.shape, np.int8)[unit.pos].reshape(unit.view)
                    sizes = [view[p.dst].size for p in unit.parts]
                    rows = view[unit.parts[0].dst].shape[0]
                    assert 4 * sum(sizes) <= max(1024, 4 * sum(sizes) // rows)
                split += len(found) > np.prod(shard.shape[: param.spec.lead])
                assert np.all(hits == 1), (param.spec.name, shard.index)
    assert (gathered > 0) == (rules is HEAD_DIM_RULES)
    assert split > 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_shard_slicing_an_inner_axis_loads_bit_for_bit(ckpt, hf_tensors, dtype):
    """head_dim split over the model axis: o_proj's shards take part of each head's columns
    (read whole, then sliced); every parameter equals the released tensors converted."""
    mesh = make_mesh(1, 2)
    _, params = load(ckpt, dtype=dtype, mesh=mesh, rules=HEAD_DIM_RULES, quiet=True)
    assert params["grok/layers/layer/attn"]["o_proj"].sharding.spec[3] == "model"  # [L, D, N, H]
    want = hf_to_params(CONFIG, hf_tensors(CONFIG), dtype)
    for module, tensors in want.items():
        for name, array in tensors.items():
            got = np.asarray(params[module][name])
            np.testing.assert_array_equal(
                got.view(f"u{got.itemsize}"), array.view(f"u{array.itemsize}"), err_msg=name
            )
