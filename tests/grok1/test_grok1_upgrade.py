"""The Grok-1 upgrade path: ckpt-0 pickles -> grok.Model, int8 on device, the converter, and
the Grok-1 / Grok-2 preset differences one field at a time.

Every logits check is against the float64 reference (tests/reference.py) run on the weights
the model actually holds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from grok1_fixtures import write_grok1_checkpoint
from reference import expected_tensor_shapes, random_tensors, reference_logits

import grok
from grok.api import Model
from grok.api import load_pretrained as load_grok1  # reads a ckpt-0 folder (grok.grok1)
from grok.checkpoint import CheckpointFiles, hf_to_params
from grok.errors import CheckpointError, ConfigError, UnsafePickleError
from grok.grok1 import (
    QuantizedWeight8bit,
    dequantize,
    is_grok1_checkpoint,
    read_grok1_checkpoint,
    release_file_name,
    requantize_per_channel,
)
from grok.grok1.convert import convert_grok1_checkpoint
from grok.params import hf_to_unit, unit_to_hf, weight_specs
from grok.presets import GROK1, GROK2, TINY_GROK1, TINY_GROK2

CONFIG = TINY_GROK1  # D 64, N 4, K 2, H 16, E 8, Fe 48, L 2, V 256
MAX_REL_ERR = 1e-4  # float32 model vs float64 reference on the same weights
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def tokens_for(config, seed: int = 0, batch: int = 2, length: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length))


def as_float(tensors) -> dict[str, np.ndarray]:
    """Released-name tensors with every QuantizedWeight8bit dequantised (float64)."""
    return {
        name: dequantize(v, np.float64) if isinstance(v, QuantizedWeight8bit) else np.float64(v)
        for name, v in tensors.items()
    }


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny Grok-1 release: ``root/ckpt-0`` of int8 pickles, and what those files hold."""
    root = tmp_path_factory.mktemp("grok1")
    write_grok1_checkpoint(root / "ckpt-0", CONFIG, random_tensors(CONFIG, seed=3))
    stored = read_grok1_checkpoint(root, CONFIG)
    return root, stored


@pytest.fixture(scope="module")
def pickle_logits(release):
    root, stored = release
    model = grok.load_pretrained(root, config=CONFIG, dtype=jnp.float32)
    tokens = tokens_for(CONFIG)
    return tokens, np.asarray(model.logits(tokens), np.float64)


# Loading the pickles.


def test_load_pretrained_routes_ckpt0_and_matches_reference(release, pickle_logits):
    root, stored = release
    assert is_grok1_checkpoint(root) and is_grok1_checkpoint(root / "ckpt-0")
    assert isinstance(stored["model.layers.0.self_attn.o_proj.weight"], QuantizedWeight8bit)
    tokens, got = pickle_logits
    want = reference_logits(CONFIG, as_float(stored), tokens)
    assert got.shape == (2, 8, CONFIG.vocab_size)
    assert rel_err(got, want) < MAX_REL_ERR
    # The ckpt-0 folder itself loads the same.
    again = grok.load_pretrained(root / "ckpt-0", config=CONFIG, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(again.logits(tokens), np.float64), got)


def test_bfloat16_load_holds_the_dequantised_values_rounded_once(release):
    root, stored = release
    model = load_grok1(root, config=CONFIG, dtype=jnp.bfloat16)
    wq = np.asarray(model.params["grok/layers/layer/attn"]["q_proj"][1])  # [D, N, H]
    spec = next(s for s in weight_specs(CONFIG) if s.name == "q_proj")
    want = hf_to_unit(spec, dequantize(stored["model.layers.1.self_attn.q_proj.weight"]))
    assert wq.dtype == jnp.bfloat16
    np.testing.assert_array_equal(wq, want.astype(ml_dtypes.bfloat16))


def test_int8_keeps_release_int8_and_requantises_only_o_proj_and_w2(release, pickle_logits):
    root, stored = release
    model = load_grok1(root, config=CONFIG, dtype=jnp.float32, quantize="int8")
    assert model.quant == "int8"
    specs = {s.name: s for s in weight_specs(CONFIG)}
    attn, moe = model.params["grok/layers/layer/attn"], model.params["grok/experts"]
    held = {}  # released name -> the float value the device holds
    matrices = [(attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj"), (attn, "o_proj")]
    matrices += [(moe, "w1"), (moe, "w3"), (moe, "w2")]
    for module, name in matrices:
        q, scale = np.asarray(module[name]), np.asarray(module[name + "_scale"])
        assert q.dtype == np.int8 and scale.dtype == np.float32
        assert module[name].devices() == {jax.devices()[0]}
        for unit, released in specs[name].hf_names():
            qw = stored[released]
            value = q[unit].astype(np.float32) * scale[unit]
            held[released] = (specs[name], value)
            if name in ("o_proj", "w2"):  # 8 input blocks in the release: re-quantised
                assert qw.scales.shape[1] == 8
                step = np.abs(scale[unit]).max()
                diff = np.abs(value - hf_to_unit(specs[name], dequantize(qw)))
                assert diff.max() <= step / 2 * (1 + 1e-6)
            else:  # the release's own int8 values and scales, bit for bit
                np.testing.assert_array_equal(q[unit], hf_to_unit(specs[name], qw.weight))
                np.testing.assert_array_equal(
                    scale[unit].reshape(-1), qw.scales.astype(np.float32).reshape(-1)
                )
    tokens, pickles = pickle_logits
    got = np.asarray(model.logits(tokens), np.float64)
    # Exact against the reference on the int8 values the device holds ...
    on_device = as_float(stored)
    for released, (spec, value) in held.items():
        on_device[released] = np.float64(unit_to_hf(spec, value))
    assert rel_err(got, reference_logits(CONFIG, on_device, tokens)) < MAX_REL_ERR
    # ... and close to the dequantised release: o_proj/W2 re-rounding is the only difference.
    # Measured about 1e-2 on these random weights (int8 is ~1% per entry); 5e-2 leaves margin.
    assert rel_err(got, pickles) < 5e-2


def test_requantize_per_channel_is_identity_on_per_channel_scales():
    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, (6, 16)).astype(np.int8)
    qw = QuantizedWeight8bit(weight, rng.random((6, 1)).astype(ml_dtypes.bfloat16))
    same = requantize_per_channel(qw)
    np.testing.assert_array_equal(same.weight, weight)
    np.testing.assert_array_equal(same.scales, qw.scales.astype(np.float32))


def test_load_refuses_int8_mesh_and_bad_quantize(release):
    root, _ = release
    with pytest.raises(ConfigError, match="quantize must be None or 'int8'"):
        load_grok1(root, config=CONFIG, quantize="fp8")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    with pytest.raises(ConfigError, match="scripts/convert.py"):
        grok.load_pretrained(root, config=CONFIG, mesh=mesh)
    with pytest.raises(ConfigError, match="residual_moe"):
        load_grok1(root, config=TINY_GROK2)


def test_load_pretrained_refuses_code_in_a_pickle_before_it_runs(release, tmp_path):
    root, _ = release
    bad = tmp_path / "ckpt-0"
    bad.mkdir()
    for name in os.listdir(root / "ckpt-0"):
        os.link(root / "ckpt-0" / name, bad / name)
    marker = tmp_path / "ran"
    os.unlink(bad / release_file_name(5))
    # Protocol 0 pickle of os.system("touch <marker>").
    payload = f"cos\nsystem\n(V touch {marker}\ntR.".encode()
    (bad / release_file_name(5)).write_bytes(payload)
    with pytest.raises(UnsafePickleError, match="os.system"):
        grok.load_pretrained(tmp_path, config=CONFIG)
    assert not marker.exists()


# The converter.


def test_converted_safetensors_give_the_pickles_logits(release, pickle_logits, tmp_path):
    root, stored = release
    out = convert_grok1_checkpoint(root, tmp_path / "grok1-st", config=CONFIG, dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["hidden_act"] == "gelu_tanh"
    assert config["router_logit_softcapping"] == 0 and config["attn_temperature_len"] == 0
    assert set(CheckpointFiles(out).names) == set(expected_tensor_shapes(CONFIG))  # no lm_head
    model = grok.load_pretrained(out, dtype=jnp.float32)
    assert model.config == CONFIG
    tokens, pickles = pickle_logits
    np.testing.assert_allclose(np.asarray(model.logits(tokens), np.float64), pickles, rtol=1e-6)


def test_bfloat16_conversion_rounds_the_exact_dequantised_values(release, tmp_path):
    root, stored = release
    out = convert_grok1_checkpoint(
        root, tmp_path / "bf16", config=CONFIG, dtype="bfloat16", max_file_bytes=50_000
    )
    files = sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors")
    assert len(files) > 2 and files[0] == "pytorch_model-00001-TP-common.safetensors"
    index = CheckpointFiles(out)
    for name in ("model.layers.1.block_sparse_moe.experts.5.w2.weight", "model.norm.weight"):
        got = index.view(index.entry(name, None))
        value = stored[name]
        want = dequantize(value, ml_dtypes.bfloat16) if name.endswith("w2.weight") else value
        assert got.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got, np.asarray(want).astype(ml_dtypes.bfloat16))


def test_converter_error_mid_write_leaves_no_output_and_keeps_an_old_one(release, tmp_path):
    root, _ = release
    target = tmp_path / "out"

    def fail_after_two(path, count):
        if path.name.endswith("00002-TP-common.safetensors"):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        convert_grok1_checkpoint(root, target, config=CONFIG, max_file_bytes=50_000,
                                 on_file=fail_after_two)  # fmt: skip
    assert os.listdir(tmp_path) == []  # neither the target nor a partial folder
    # An existing output survives a failed overwrite untouched.
    convert_grok1_checkpoint(root, target, config=CONFIG)
    before = sorted(os.listdir(target))
    with pytest.raises(CheckpointError, match="already exists"):
        convert_grok1_checkpoint(root, target, config=CONFIG)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_grok1_checkpoint(root, target, config=CONFIG, max_file_bytes=50_000,
                                 overwrite=True, on_file=fail_after_two)  # fmt: skip
    assert sorted(os.listdir(target)) == before and os.listdir(tmp_path) == ["out"]


def test_converter_hard_crash_leaves_only_a_hidden_partial_folder(release, tmp_path):
    root, _ = release
    target = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {REPO!r})
        from grok.presets import TINY_GROK1
        from grok.grok1.convert import convert_grok1_checkpoint
        def crash(path, count):
            if path.name.endswith("00002-TP-common.safetensors"):
                os._exit(9)  # no cleanup, as a kill or power loss
        convert_grok1_checkpoint({str(root)!r}, {str(target)!r}, config=TINY_GROK1,
                                 max_file_bytes=50_000, on_file=crash)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 9, run.stderr
    assert not target.exists()
    (left,) = os.listdir(tmp_path)
    assert left.startswith(".out.partial-")
    names = os.listdir(tmp_path / left)
    assert len(names) == 2 and "config.json" not in names
    with pytest.raises(ConfigError):
        grok.load_pretrained(tmp_path / left)


def test_convert_script_cli(release, tmp_path):
    root, _ = release
    script = os.path.join(REPO, "scripts", "convert.py")
    out = tmp_path / "cli"
    cmd = [sys.executable, script, str(root), str(out), "--config", "tiny-grok1"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and (out / "config.json").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 1 and "already exists" in again.stderr


# Grok-2 -> Grok-1, one field at a time.

# Grok-2's tiny preset with Grok-2's real theta, so the theta flip shows.
BASE = TINY_GROK2.replace(rope_theta=GROK2.rope_theta)

# Each behaviour the spec lists (section 3), as the fields that carry it, valued as in Grok-1.
FLIPS: dict[str, dict[str, object]] = {
    "router cap off": {"router_logit_softcapping": None},
    "final cap off": {"final_logit_softcapping": None},
    "no attention temperature": {"attn_temperature_len": None},
    "no dense MLP": {"residual_moe": False, "intermediate_size": 0},
    "head tied to the embedding": {"tie_word_embeddings": True},
    "output multiplier 1/sqrt 3": {"output_multiplier_scale": GROK1.output_multiplier_scale},
    "tanh GELU": {"hidden_act": "gelu_tanh"},
    "theta 10000": {"rope_theta": GROK1.rope_theta},
}
# Fields that differ between the presets but compute the same thing for these shapes.
SAME_BEHAVIOUR: dict[str, dict[str, object]] = {
    # Grok-1 names its attention scale; it is H**-0.5, Grok-2's implicit scale (16**-0.5).
    "attention multiplier H**-0.5": {"attn_output_multiplier": TINY_GROK1.attn_output_multiplier},
    # YaRN knobs: unused by rope_type "original", which both presets run.
    "YaRN knobs": {
        "original_max_position_embeddings": None,
        "scaling_factor": 1.0,
        "beta_fast": TINY_GROK1.beta_fast,
    },  # fmt: skip
}
SHAPES = {"moe_intermediate_size": TINY_GROK1.moe_intermediate_size}


def library_logits(config, tensors, tokens) -> np.ndarray:
    params = jax.tree_util.tree_map(jnp.asarray, hf_to_params(config, tensors, jnp.float32))
    return np.asarray(Model(config, params, dtype=jnp.float32).logits(tokens), np.float64)


def for_config(config, tensors) -> dict[str, np.ndarray]:
    return {name: tensors[name] for name in expected_tensor_shapes(config)}


@pytest.fixture(scope="module")
def base_case():
    tensors = random_tensors(BASE, seed=7)
    tokens = tokens_for(BASE, seed=7)
    return tensors, tokens, reference_logits(BASE, tensors, tokens)


def changed_fields(a, b) -> set[str]:
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return {k for k in da if da[k] != db[k]}


def test_the_flips_and_shapes_turn_grok2_into_grok1_exactly():
    tiny = BASE
    for fields in (*FLIPS.values(), *SAME_BEHAVIOUR.values(), SHAPES):
        tiny = tiny.replace(**fields)
    assert tiny == TINY_GROK1
    # Full size: the same fields plus Grok-1's shapes (the embedding multiplier is sqrt(D) in
    # both) and context.
    full = GROK2
    for fields in (*FLIPS.values(), *SAME_BEHAVIOUR.values()):
        full = full.replace(**fields)
    full = full.replace(
        attn_output_multiplier=GROK1.attn_output_multiplier,
        hidden_size=6144,
        num_attention_heads=48,
        moe_intermediate_size=32768,
        embedding_multiplier_scale=6144**0.5,
        max_position_embeddings=8192,
    )
    assert full == GROK1
    assert GROK1.attn_output_multiplier == GROK1.head_dim**-0.5 == GROK2.attn_scale


@pytest.mark.parametrize("flip", list(FLIPS))
def test_each_grok1_flip_changes_the_logits_as_the_spec_says(flip, base_case):
    tensors, tokens, base_logits = base_case
    config = BASE.replace(**FLIPS[flip])
    assert changed_fields(BASE, config) == set(FLIPS[flip])  # nothing else moved
    weights = for_config(config, tensors)
    want = reference_logits(config, weights, tokens)
    got = library_logits(config, weights, tokens)
    assert rel_err(got, want) < MAX_REL_ERR  # the library does what the reference does
    # ... and that is a real change: far above the agreement tolerance.
    assert rel_err(want, base_logits) > 10 * MAX_REL_ERR  # tanh GELU, the smallest, measured 1.2e-3


def test_fields_that_differ_but_compute_the_same(base_case):
    tensors, tokens, base_logits = base_case
    config = BASE
    for group, fields in SAME_BEHAVIOUR.items():
        config = config.replace(**fields)
        alone = BASE.replace(**fields)
        assert rel_err(reference_logits(alone, tensors, tokens), base_logits) < 1e-12, group
    # The library with all of them at once (one compile): still the base logits.
    assert rel_err(library_logits(config, tensors, tokens), base_logits) < MAX_REL_ERR
    # The attention multiplier is live: a value other than H**-0.5 shows.
    other = BASE.replace(attn_output_multiplier=0.4)
    assert rel_err(library_logits(other, tensors, tokens), base_logits) > 10 * MAX_REL_ERR
