"""``scripts/benchmark.py`` (``grok.bench.benchmark``) on tiny shapes: the engines' children
called directly, the GGUF file llama.cpp reads, the report's sanity checks and ratios, and one
run end to end as a user would start it. The llama.cpp peer's own checks skip where
``llama-cpp-python`` is not installed (it is optional, built from source)."""

from __future__ import annotations

import argparse
import importlib.util
import json

import jax.numpy as jnp
import numpy as np
import pytest

from grok.bench import benchmark, gguf_file, report
from grok.bench.grok_engine import bench_model, long_child, weights_of
from grok.bench.harness import run_child
from grok.errors import ConfigError
from grok.presets import TINY_GROK1, TINY_GROK2
from grok.testing import random_params

# Grok-1's shape, as bench-grok1, with a vocabulary llama.cpp's tokenizer takes (>= 259) and
# experts a whole number of Q8_0 blocks wide.
LLAMA_SHAPE = TINY_GROK1.replace(vocab_size=512, moe_intermediate_size=64)
needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (optional: docs/performance.md)",
)


def _args(**kw) -> argparse.Namespace:
    base = dict(shape="tiny-grok1", dtype="bfloat16", threads=2, T=8, N=4, batch=[1, 2])
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture
def shape_file(tmp_path):
    """``--shape`` as a config path (``resolve`` takes one)."""
    path = tmp_path / "config.json"
    LLAMA_SHAPE.save(path)
    return str(path)


def test_long_prompt_child_times_prefill_and_decode():
    """Called directly (``main --child`` would pin this process's CPUs)."""
    args = _args(shape="tiny-grok2", dtype="float32", long_prompt=600, long_decode=4)
    out = long_child(args)  # 600 is past the tiny preset's 512 positions: the child widens them
    json.dumps(out)  # what the child prints
    assert out["tokens"] == 600
    assert out["ttft_s"] > 0 and out["ttft_s_compiled"] > 0
    assert out["decode_ms_per_token"] > 0
    assert out["peak_rss_bytes"] > 10 * 2**20


def test_grok_fp8_engine_keeps_float8_weights():
    """The benchmark's ``fp8`` format: bf16 activations, float8 matrices with their scales
    (the child runs it as the bf16 one, which the end-to-end test runs)."""
    assert weights_of("fp8") == ("bfloat16", "fp8") and weights_of("float32") == ("float32", None)
    model = bench_model(TINY_GROK1, "fp8")
    assert model.quant == "fp8" and model.dtype == jnp.bfloat16
    attn = model.params["grok/layers/layer/attn"]
    assert attn["q_proj"].dtype == jnp.float8_e4m3fn and attn["q_proj_scale"].dtype == jnp.float32


@pytest.mark.parametrize("fmt", gguf_file.GGUF_FORMATS)
def test_gguf_file_is_mixtral_layout_with_the_benchmarks_weights(tmp_path, fmt):
    gguf = pytest.importorskip("gguf")
    path = gguf_file.write_gguf(tmp_path / "m.gguf", LLAMA_SHAPE, fmt)
    reader = gguf.GGUFReader(path)
    fields = {f.name: f for f in reader.fields.values()}
    c = LLAMA_SHAPE

    def value(key):
        return fields[key].contents()

    assert value("general.architecture") == "llama"
    assert value("llama.expert_count") == c.num_local_experts
    assert value("llama.expert_used_count") == c.num_experts_per_tok
    assert value("llama.feed_forward_length") == c.moe_intermediate_size
    assert value("llama.attention.head_count_kv") == c.num_key_value_heads
    assert len(value("tokenizer.ggml.tokens")) == c.vocab_size
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # Grok-1's head is the embedding
    assert len(tensors) == 2 + c.num_hidden_layers * 10
    want = random_params(c, host=True)
    up = tensors["blk.1.ffn_up_exps.weight"]
    assert up.tensor_type.name == {"float32": "F32", "bfloat16": "BF16", "q8_0": "Q8_0"}[fmt]
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type.name == "F32"  # as llama.cpp keeps
    got = gguf.quants.dequantize(up.data, up.tensor_type).reshape(
        want["grok/experts"]["w3"][1].shape
    )
    tol = {"float32": 0, "bfloat16": 0.01, "q8_0": 0.01}[fmt]
    np.testing.assert_allclose(got, want["grok/experts"]["w3"][1], rtol=tol, atol=tol * 0.02 * 2)


def test_gguf_refuses_what_llama_cannot_hold(tmp_path):
    with pytest.raises(ConfigError, match="dense MLP"):
        gguf_file.check_config(TINY_GROK2)
    with pytest.raises(ConfigError, match="vocab_size 256"):
        gguf_file.check_config(TINY_GROK1)
    with pytest.raises(ConfigError, match="moe_intermediate_size 48 is not a multiple"):
        gguf_file.check_config(TINY_GROK1.replace(vocab_size=512), "q8_0")
    with pytest.raises(ConfigError, match="GGUF format 'q4_0'"):
        gguf_file.write_gguf(tmp_path / "x.gguf", LLAMA_SHAPE, "q4_0")
    assert not (tmp_path / "x.gguf").exists()


@needs_llama
def test_llama_child_generates_on_both_formats(tmp_path, shape_file):
    from grok.bench.llama import llama_child

    for fmt in ("bfloat16", "q8_0"):
        gguf_file.write_gguf(gguf_file.gguf_path(tmp_path, shape_file, fmt), LLAMA_SHAPE, fmt)
        out = llama_child(_args(shape=shape_file, dtype=fmt, gguf_dir=str(tmp_path)))
        for b in (1, 2):
            f = out[f"b{b}"]
            assert all(f[k] > 0 for k in ("prefill_s", "ttft_s", "decode_tok_s", "generate_s"))
            assert f["ttft_s"] < f["generate_s"]


def _run(decode, ttft=0.01, load=1.0):
    return {
        "b1": {"decode_tok_s": decode[0], "prefill_s": 0.01, "ttft_s": ttft, "generate_s": 1.0},
        "b8": {"decode_tok_s": decode[1], "prefill_s": 0.05, "ttft_s": ttft, "generate_s": 1.0},
        "load_before": load,
        "load_after": load,
    }


def _saved(runs) -> dict:
    return {
        "runs": runs,
        "batch": [1, 8],
        "cores": 2,
        "shape": "bench-grok1",
        "prompt_len": 128,
        "new_tokens": 128,
        "threads": 2,
        "repeats": 2,
        "load_start": [1.0, 1.0, 1.0],
        "load_end": [1.0, 1.0, 1.0],
        "wall_s": 60.0,
    }


def test_report_ratios_per_group_and_peer_and_the_refusals(capsys):
    res = _saved(
        {
            "grok": {"bfloat16": [_run((300, 900))] * 2, "fp8": [_run((400, 1000))] * 2},
            "llama": {"bfloat16": [_run((100, 450))] * 2, "q8_0": [_run((200, 100))] * 2},
            "mixtral": {"bfloat16": [_run((100, 300), load=4.0)] * 2},
        }
    )
    report.evaluate(res)
    assert res["ratios"]["bfloat16"]["llama"]["decode b1"] == pytest.approx(3.0)
    assert res["ratios"]["bfloat16"]["llama"]["decode b8"] == pytest.approx(2.0)
    assert "machine load reached 4.0" in res["ratios"]["bfloat16"]["mixtral"]["refused"][0]
    assert "batch 8 decodes fewer" in res["ratios"]["8-bit"]["llama"]["refused"][0]
    report.print_report(res)
    out = capsys.readouterr().out
    assert "grok bfloat16" in out and "llama q8_0" in out and "grok/llama" in out
    assert "3.00x" in out and "no ratio: llama q8_0" in out


def test_report_rereads_a_file_of_the_earlier_format(tmp_path, capsys):
    """Files written before the llama.cpp peer (grok and Mixtral runs only) still report."""
    saved = _saved(
        {"grok": {"float32": [_run((200, 500))]}, "mixtral": {"float32": [_run((60, 150))]}}
    )
    saved["ratios"] = {"float32": {"decode b1": 3.3}}  # the old flat form, recomputed
    path = tmp_path / "old.json"
    path.write_text(json.dumps(saved))
    benchmark.main(["--report", str(path)])
    out = capsys.readouterr().out
    assert "grok/mixtral" in out and "3.33x" in out


def test_a_missing_peer_is_skipped_with_its_reason(monkeypatch, capsys):
    monkeypatch.setitem(benchmark.PEERS_MISSING, "llama", lambda: "llama-cpp-python is absent")
    monkeypatch.setitem(benchmark.PEERS_MISSING, "mixtral", lambda: None)
    skipped = {}
    args = benchmark.parse_args(["--engines", "grok", "mixtral", "llama", "--no-mixtral"])
    assert benchmark.available_engines(args, skipped) == ["grok"]
    assert skipped == {"llama": "llama-cpp-python is absent"}
    assert "llama skipped: llama-cpp-python is absent" in capsys.readouterr().out


def test_a_failing_child_is_recorded_not_raised(tmp_path, capsys):
    missing = str(tmp_path / "nonesuch.json")
    figures = run_child("json.tool", [missing], "a child")  # fails at once, stderr says why
    assert figures["error"].startswith("exit status 2: ") and "nonesuch.json" in figures["error"]
    assert figures["wall_s"] > 0 and "load_before" in figures
    assert "a child" in capsys.readouterr().out


@pytest.mark.slow
def test_benchmark_end_to_end_in_fresh_processes(tmp_path, shape_file, capsys):
    """As a user starts it: each engine a fresh process, the JSON and the table. llama.cpp
    runs where it is installed, else it is skipped with the reason."""
    out = tmp_path / "bench.json"
    argv = ["--engines", "grok", "llama", "--shape", shape_file, "--dtype", "bfloat16"]
    argv += ["--repeats", "1", "--prompt-len", "8", "--new-tokens", "4", "--batch", "2"]
    benchmark.main([*argv, "--no-full-width", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["summary"]["grok bfloat16"]["b2"]["decode_tok_s"]["median"] > 0
    if importlib.util.find_spec("llama_cpp") is None:
        assert "llama-cpp-python is not installed" in res["skipped"]["llama"]
    else:
        assert res["summary"]["llama bfloat16"]["b2"]["ttft_s"]["median"] > 0
        assert "llama" in res["ratios"]["bfloat16"] or res["problems"]["llama bfloat16"]
    assert "grok bfloat16" in capsys.readouterr().out
