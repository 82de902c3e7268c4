"""Config: field names, validation, presets, JSON round trips, the file fallback."""

import json

import pytest

from grok.config import GrokConfig, load_config
from grok.errors import ConfigError
from grok.params import count_parameters
from grok.presets import GROK1, GROK2, PRESETS, get_preset

RELEASED = {  # the released config.json values (spec section 1), with extra keys
    "vocab_size": 131072,
    "hidden_size": 8192,
    "num_hidden_layers": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 32768,
    "moe_intermediate_size": 16384,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "residual_moe": True,
    "rms_norm_eps": 1e-5,
    "embedding_multiplier_scale": 90.50966799187809,
    "output_multiplier_scale": 0.5,
    "attn_logit_softcapping": 30.0,
    "router_logit_softcapping": 30.0,
    "final_logit_softcapping": 50,
    "attn_temperature_len": 1024,
    "rope_theta": 208533496,
    "rope_type": "original",
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 8192,
    "scaling_factor": 16.0,
    "extrapolation_factor": 1.0,
    "attn_factor": 1.0,
    "beta_fast": 8,
    "beta_slow": 1,
    "sliding_window_size": -1,
    "global_attn_every_n": 1,
    "model_type": "git",
    "architectures": ["Grok1ForCausalLM"],
    "torch_dtype": "bfloat16",
}


def test_released_config_equals_preset():
    assert GrokConfig.from_dict(RELEASED) == GROK2


def test_shipped_config_files_match_presets(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    assert load_config(root / "config_grok2_like.json") == GROK2
    assert load_config(root / "grok1.json") == GROK1


def test_directory_falls_back_to_grok2_like(tmp_path):
    (tmp_path / "config_grok2_like.json").write_text(json.dumps(RELEASED))
    assert load_config(tmp_path) == GROK2
    small = dict(RELEASED, num_hidden_layers=2)
    (tmp_path / "config.json").write_text(json.dumps(small))
    assert load_config(tmp_path).num_hidden_layers == 2  # config.json wins


def test_missing_directory_config(tmp_path):
    with pytest.raises(ConfigError, match="config.json or config_grok2_like.json"):
        load_config(tmp_path)


@pytest.mark.parametrize("key", ["hidden_size", "rope_theta", "num_key_value_heads", "head_dim"])
def test_missing_required_key_is_named(key):
    data = dict(RELEASED)
    del data[key]
    with pytest.raises(ConfigError, match=repr(key)):
        GrokConfig.from_dict(data, source="x/config.json")


@pytest.mark.parametrize(
    "key,value",
    [("hidden_size", "8192"), ("residual_moe", 1), ("num_hidden_layers", 64.0), ("rope_type", 3)],
)
def test_wrong_type_is_named(key, value):
    with pytest.raises(ConfigError, match=repr(key)):
        GrokConfig.from_dict(dict(RELEASED, **{key: value}))


def test_bad_values():
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        GrokConfig.from_dict(dict(RELEASED, num_key_value_heads=7))
    with pytest.raises(ConfigError, match="rope_type"):
        GrokConfig.from_dict(dict(RELEASED, rope_type="linear"))
    with pytest.raises(ConfigError, match="not valid JSON"):
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            f.write("{not json")
        load_config(f.name)


@pytest.mark.parametrize("off", [None, 0, -1])
def test_caps_and_temperature_off(off):
    data = dict(RELEASED)
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "attn_temperature_len"):
        if off is None:
            del data[key]
        else:
            data[key] = off
    cfg = GrokConfig.from_dict(data)
    assert cfg.attn_logit_softcapping is None
    assert cfg.final_logit_softcapping is None
    assert cfg.attn_temperature_len is None
    assert cfg.router_logit_softcapping == 30.0


def test_residual_moe_absent_means_false():
    data = dict(RELEASED)
    del data["residual_moe"]
    assert GrokConfig.from_dict(data).residual_moe is False


def test_hidden_act_aliases():
    assert GrokConfig.from_dict(dict(RELEASED, hidden_act="gelu_pytorch_tanh")).hidden_act == (
        "gelu_tanh"
    )
    with pytest.raises(ConfigError, match="hidden_act"):
        GrokConfig.from_dict(dict(RELEASED, hidden_act="relu"))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name, tmp_path):
    cfg = get_preset(name)
    cfg.save(tmp_path / "config.json")
    assert load_config(tmp_path) == cfg


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("grok3")


def test_frozen():
    with pytest.raises(AttributeError):
        GROK2.hidden_size = 1  # type: ignore[misc]


def test_parameter_counts_from_weight_table():
    assert count_parameters(GROK2) == 269_515_497_472
    assert count_parameters(GROK1) == 315_684_820_992


def test_kv_cache_bytes_per_token():
    assert GROK2.kv_cache_bytes_per_token(2) == 64 * 2 * 8 * 128 * 2 == 256 * 1024


def test_sliding_window_refused():
    with pytest.raises(ConfigError, match="sliding_window_size"):
        GrokConfig.from_dict(dict(RELEASED, sliding_window_size=4096))
