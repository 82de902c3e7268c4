"""Presets: the spec's numbers, their one home, and the one "preset or path" resolver."""

import pytest

import grok
from grok import config as config_module
from grok import presets
from grok.errors import ConfigError
from grok.presets import GROK1, GROK2, TINY_GROK2, resolve_config


def test_spec_numbers():
    # The literals of docs/spec.md sections 1 and 3, against the expressions.
    assert GROK2.embedding_multiplier_scale == 90.50966799187809
    assert GROK1.embedding_multiplier_scale == 78.38367176906169
    assert GROK1.output_multiplier_scale == 0.5773502691896257
    assert GROK1.attn_output_multiplier == 0.08838834764831845
    assert GROK2.max_position_embeddings == (
        GROK2.original_max_position_embeddings * GROK2.scaling_factor
    )


def test_presets_live_in_grok_presets_only():
    # One home: grok.config defines GrokConfig and nothing of the presets (no PEP 562 hook
    # reaching back into grok.presets, which imports grok.config).
    for name in ("GROK2", "GROK1", "TINY_GROK2", "TINY_GROK1", "PRESETS", "get_preset"):
        assert not hasattr(config_module, name), name
        assert getattr(presets, name) is not None
    assert grok.GROK2 is GROK2
    assert presets.get_preset("tiny-grok2") is TINY_GROK2


def test_resolve_config_name_file_and_directory(tmp_path):
    assert resolve_config("grok1") is GROK1
    TINY_GROK2.save(tmp_path / "config.json")
    assert resolve_config(tmp_path / "config.json") == TINY_GROK2
    assert resolve_config(tmp_path) == TINY_GROK2
    assert resolve_config(str(tmp_path)) == TINY_GROK2


@pytest.mark.parametrize("value", ["grok3", "/nonexistent/config.json", ""])
def test_resolve_config_refuses_what_is_neither(value):
    with pytest.raises(ConfigError, match="neither a preset") as err:
        resolve_config(value)
    assert repr(value) in str(err.value) and "tiny-grok1" in str(err.value)


def test_resolve_config_reports_a_bad_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve_config(tmp_path / "config.json")
