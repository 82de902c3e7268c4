"""grok-sample end to end on a tiny checkpoint and tokenizer written by the test.

Most runs call ``main(argv)`` in-process; a bad flag and binary stdin run
``scripts/sample.py`` in a subprocess with the venv's python, as a user would
(``tests/test_builtin.py`` runs it with no arguments).
"""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_generate import random_params

import grok
from grok import memory_plan
from grok.cli import sample as cli
from grok.errors import MemoryPlanError
from grok.presets import TINY_GROK2
from grok.testing import write_checkpoint
from grok.tokenizer import write_tok_json

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "sample.py"
# 3 special tokens, then the 256 bytes: every text encodes (one token per byte).
CONFIG = TINY_GROK2.replace(vocab_size=264)
SPECIALS = {"<|pad|>": 0, "<|separator|>": 1, "<|eos|>": 2}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    write_checkpoint(path, CONFIG, random_params(CONFIG, 1), tp=2)
    write_tok_json(path / "tokenizer.tok.json", {bytes([b]): 3 + b for b in range(256)}, SPECIALS)
    return path


@pytest.fixture(scope="module")
def bare_checkpoint(tmp_path_factory):
    """A checkpoint directory without a tokenizer."""
    path = tmp_path_factory.mktemp("bare")
    write_checkpoint(path, CONFIG, random_params(CONFIG, 1), tp=2)
    return path


def run_script(*args, stdin=""):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def assert_one_line_error(proc, status, *fragments):
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("grok-sample: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_batch_and_streaming_chat_runs_agree(checkpoint, tmp_path, monkeypatch, capsys):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Hi there, é!", encoding="utf-8")
    common = [
        "--checkpoint", checkpoint, "--chat", "--max-new-tokens", 8, "--dtype", "float32",
        "--temperature", 0.8, "--top-k", 40, "--top-p", 0.95, "--min-p", 0.01, "--seed", 7,
    ]  # fmt: skip
    argv = [*common, "--prompt", "Hi there, é!", "--prompt", f"@{prompt_file}"]
    assert cli.main(list(map(str, argv))) == 0
    batch = capsys.readouterr()
    assert "2 sequence(s)" in batch.err
    assert "time to first token" in batch.err and "tokens/s" in batch.err
    parts = batch.out.split("--- completion 1 ---\n")
    assert len(parts) == 2 and parts[0].startswith("--- completion 0 ---\n")
    first = parts[0].removeprefix("--- completion 0 ---\n")

    # One prompt (from stdin) streams token by token. Row 0 draws with the same key in both
    # runs, so the streamed text equals the batch's first completion.
    stdin = io.TextIOWrapper(io.BytesIO("Hi there, é!".encode()), encoding="utf-8")
    monkeypatch.setattr("sys.stdin", stdin)
    assert cli.main(list(map(str, [*common, "--prompt", "-"]))) == 0
    stream = capsys.readouterr()
    assert "1 sequence(s)" in stream.err
    assert stream.out == first and first.strip()


def test_bad_flag_value(checkpoint):
    proc = run_script("--checkpoint", checkpoint, "--prompt", "x", "--dtype", "int7")
    assert_one_line_error(proc, 2, "--dtype", "int7")


def test_missing_tokenizer(bare_checkpoint, capsys):
    assert cli.main(["--checkpoint", str(bare_checkpoint), "--prompt", "x"]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("grok-sample: error: ") and "\n" not in line
    assert "no tokenizer" in line and "--tokenizer" in line


def test_prompt_longer_than_context(checkpoint, capsys):
    argv = ["--checkpoint", str(checkpoint), "--prompt", "x" * 200, "--dtype", "float32"]
    assert cli.main(argv) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("grok-sample: error: ") and "\n" not in line
    assert "200 tokens" in line and "context" in line


@pytest.mark.parametrize(
    ("extra", "status", "fragment"),
    [
        (["--temperature", "-1"], 1, "temperature"),
        (["--top-p", "1.5"], 1, "top_p"),
        (["--max-new-tokens", "-3"], 2, "--max-new-tokens: expected an integer >= 0, got '-3'"),
        (["--seed", "-1"], 2, "--seed"),
        (["--top-k", "0"], 2, "--top-k: expected an integer >= 1, got '0'"),
        (["--temperature", "nan"], 2, "--temperature: expected a finite number, got 'nan'"),
        (["--mesh", "8"], 2, "DATAxMODEL"),
        (["--prompt", "@/nonexistent/prompt.txt"], 2, "cannot read"),
        (["--tokenizer", "/nonexistent/tok.json"], 1, "not found"),
        (["--max-new-tokens", "many"], 2, "expected an integer, got 'many'"),
    ],
)
def test_error_paths_in_process(checkpoint, capsys, extra, status, fragment):
    argv = ["--checkpoint", str(checkpoint), "--prompt", "x", "--dtype", "float32", *extra]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == status
    assert len(err) == 1 and err[0].startswith("grok-sample: error: ") and fragment in err[0]


def test_no_checkpoint_and_no_builtin_model(monkeypatch, capsys):
    monkeypatch.setattr(cli, "builtin_checkpoint", lambda: None)
    assert cli.main(["--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "no --checkpoint given" in err and "--checkpoint DIR" in err


def test_no_prompt(checkpoint, capsys):
    assert cli.main(["--checkpoint", str(checkpoint)]) == 2
    assert "no prompt" in capsys.readouterr().err


def test_parse_mesh():
    assert cli.parse_mesh("1x8") == (1, 8)
    assert cli.parse_mesh("2X4") == (2, 4)
    for bad in ("8", "0x8", "1x2x3", "axb"):
        with pytest.raises(cli.UsageError):
            cli.parse_mesh(bad)


def test_binary_stdin_is_one_line_error(checkpoint, monkeypatch, capsys):
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9 \xff\xfe"), encoding="utf-8")
    monkeypatch.setattr("sys.stdin", stdin)
    assert cli.main(["--checkpoint", str(checkpoint), "--prompt", "-"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "grok-sample: error: --prompt -: stdin is not UTF-8 text (byte 0xe9 at offset 3)"
    ]


def test_binary_stdin_in_a_utf8_locale_subprocess(checkpoint):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": ""}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--checkpoint", str(checkpoint), "--prompt", "-"],
        input=b"\x80\x81 binary",
        capture_output=True,
        env=env,
        timeout=300,
    )
    proc.stderr = proc.stderr.decode()
    assert_one_line_error(proc, 2, "stdin is not UTF-8", "0x80")


def test_stdin_read_once_for_two_dashes():
    stdin = io.TextIOWrapper(io.BytesIO("é\n".encode()), encoding="latin-1")
    assert cli.read_prompts(["-", "x", "-"], stdin) == ["é\n", "x", "é\n"]  # UTF-8 always
    assert cli.read_prompts(["-"], io.StringIO("plain")) == ["plain"]


def test_huge_batch_refused_by_the_memory_plan(checkpoint):
    """2^22 one-token prompts: the plan's error, at once, not the backend's out-of-memory."""
    model = grok.load_pretrained(checkpoint, dtype="float32", quiet=True)
    with pytest.raises(MemoryPlanError, match="generating 4194304 sequence") as err:
        model.generate([[5]] * 2**22, max_new_tokens=8)
    assert "KV cache" in str(err.value)


def test_cli_batch_over_the_device_memory_is_one_line(checkpoint, monkeypatch, capsys):
    weights = memory_plan.plan_memory(CONFIG, {}, dtype="float32").weights
    # Room for the weights and 64 KiB: loading fits, a 2 x 128-slot cache (256 KiB) does not.
    monkeypatch.setattr(memory_plan, "device_bytes_limit", lambda device: weights + 2**16)
    argv = ["--checkpoint", str(checkpoint), "--dtype", "float32", "--prompt", "a", "--prompt", "b"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    # Refused by the plan before loading: weights plus the KV cache of B=2, S=128.
    assert len(err) == 1 and err[0].startswith(f"grok-sample: error: {checkpoint}: each device")
    assert "DOES NOT FIT" in err[0] and "B=2 S=128" in err[0]
