"""Presets: the spec's numbers, the old import path, and the one "preset or path" resolver."""

import pytest

import grok
from grok import config as config_module
from grok import presets
from grok.errors import ConfigError
from grok.presets import GROK1, GROK2, TINY_GROK2, resolve_config


def test_spec_numbers():
    # The literals of ../shared/spec/grok2.md sections 1 and 3, against the expressions.
    assert GROK2.embedding_multiplier_scale == 90.50966799187809
    assert GROK1.embedding_multiplier_scale == 78.38367176906169
    assert GROK1.output_multiplier_scale == 0.5773502691896257
    assert GROK1.attn_output_multiplier == 0.08838834764831845
    assert GROK2.max_position_embeddings == (
        GROK2.original_max_position_embeddings * GROK2.scaling_factor
    )


@pytest.mark.parametrize("name", sorted(config_module._MOVED_TO_PRESETS))
def test_old_names_still_import_from_grok_config(name):
    assert getattr(config_module, name) is getattr(presets, name)


def test_old_from_import_and_package_names():
    from grok.config import GROK2 as old_grok2
    from grok.config import get_preset as old_get_preset

    assert old_grok2 is GROK2 is grok.GROK2
    assert old_get_preset("tiny-grok2") is TINY_GROK2
    with pytest.raises(AttributeError, match="no_such_name"):
        config_module.no_such_name  # noqa: B018


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
