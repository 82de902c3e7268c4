"""The command-line programs other than grok-sample: grok-plan, grok-convert, what they share,
and the scripts/ wrappers. Bad input: exit status, one line on stderr naming the value, and the
input left as it was. Most run ``main(argv)`` in-process; one runs a wrapper as a user would."""

import argparse
import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from grok.cli import common
from grok.cli import convert as convert_cli
from grok.cli import plan as plan_cli
from grok.errors import CheckpointError, ConfigError, MemoryPlanError
from grok.memory_plan import plan_memory
from grok.presets import GROK2, TINY_GROK2

ROOT = Path(__file__).resolve().parent.parent


def one_line_error(capsys, prog):
    """The only line of stderr, which must be ``PROG: error: ...``."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


def call(main, argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


# What every program shares.


@pytest.mark.parametrize(
    ("kind", "text", "fragment"),
    [
        (common.positive_int, "0", "expected an integer >= 1, got '0'"),
        (common.positive_int, "-3", "got '-3'"),
        (common.positive_int, "1.5", "expected an integer, got '1.5'"),
        (common.nonnegative_int, "-1", "expected an integer >= 0, got '-1'"),
        (common.positive_float, "nan", "expected a finite number, got 'nan'"),
        (common.positive_float, "-inf", "got '-inf'"),
        (common.positive_float, "-1", "expected a number > 0, got '-1'"),
        (common.positive_float, "0", "got '0'"),
        (common.positive_float, "four", "expected a number, got 'four'"),
        (common.finite_float, "inf", "finite"),
    ],
)
def test_argument_types_refuse(kind, text, fragment):
    with pytest.raises(argparse.ArgumentTypeError, match="expected") as err:
        kind(text)
    assert fragment in str(err.value)


def test_argument_types_accept():
    assert common.positive_int("8") == 8
    assert common.nonnegative_int("0") == 0
    assert common.positive_float("1e-3") == 1e-3
    assert common.finite_float("-0.5") == -0.5


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ConfigError("config field 'x' must be > 0,\ngot -1"), 1),
        (FileNotFoundError(2, "No such file or directory", "/no/such"), 1),
        (common.UsageError("--mesh 8: expected DATAxMODEL"), 2),
        (KeyboardInterrupt(), 130),
    ],
)
def test_run_program_turns_errors_into_one_line(capsys, error, status):
    def run(args):
        raise error

    parser = common.Parser(prog="grok-x")
    assert common.run_program(parser, run, []) == status
    line = one_line_error(capsys, "grok-x")
    assert "Traceback" not in line
    if not isinstance(error, KeyboardInterrupt):
        assert str(error).split()[-1] in line


def test_parser_error_is_one_line_with_status_2(capsys):
    parser = common.Parser(prog="grok-x")
    parser.add_argument("--n", type=common.positive_int)
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["--n", "0"])
    assert done.value.code == 2
    assert "argument --n: expected an integer >= 1, got '0'" in one_line_error(capsys, "grok-x")


# grok-plan and plan_memory.


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--model", "0"], "--model: expected an integer >= 1, got '0'"),
        (["--data", "-2"], "--data"),
        (["--context", "-100000000"], "--context: expected an integer >= 0, got '-100000000'"),
        (["--batch", "-1"], "--batch"),
        (["--device-gb", "nan"], "--device-gb: expected a finite number, got 'nan'"),
        (["--device-gb", "-80"], "--device-gb"),
        (["--config", "/nonexistent/config.json"], "'/nonexistent/config.json' is neither"),
        (["--config"], "expected one argument"),
        (["--preset", "grok3"], "invalid choice: 'grok3'"),
    ],
)
def test_plan_refuses(capsys, argv, fragment):
    assert call(plan_cli.main, argv) == 2
    assert fragment in one_line_error(capsys, "grok-plan")


def test_plan_refuses_a_mesh_that_does_not_divide(capsys):
    assert plan_cli.main(["--config", "tiny-grok2", "--model", "3"]) == 2
    one_line_error(capsys, "grok-plan")


def test_plan_fits_and_does_not_fit(capsys, tmp_path):
    TINY_GROK2.save(tmp_path / "config.json")
    assert plan_cli.main(["--config", str(tmp_path), "--model", "2", "--device-gb", "1"]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "model=2" in out
    assert plan_cli.main(["--model", "8", "--device-gb", "40"]) == 1  # Grok-2 bf16: 62.8 GiB
    assert "DOES NOT FIT" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("mesh", "kwargs", "fragment"),
    [
        ({"model": 0}, {}, "mesh axis 'model' must be an int >= 1, got 0"),
        ({"data": -1, "model": 8}, {}, "mesh axis 'data'"),
        ({"model": 2.0}, {}, "got 2.0"),
        ({"model": True}, {}, "got True"),
        ({"model": 8}, {"batch": -1, "context": 16}, "batch must be an int >= 0, got -1"),
        ({"model": 8}, {"batch": 1, "context": -100000000}, "context must be an int >= 0"),
        ({"model": 8}, {"quantize": "int4"}, "quantize"),
    ],
)
def test_plan_memory_refuses_bad_sizes(mesh, kwargs, fragment):
    with pytest.raises(MemoryPlanError) as err:
        plan_memory(GROK2, mesh, **kwargs)
    assert fragment in str(err.value)


# grok-convert: refused before anything is written, the input left as it was.


@pytest.fixture
def ckpt(tmp_path):
    """A folder that looks like a Grok-1 release (``ckpt-0/tensor00000_000`` ...) to the
    command line's checks; every refusal here comes before a tensor is read."""
    root = tmp_path / "grok-1"
    (root / "ckpt-0").mkdir(parents=True)
    for i in range(3):
        (root / "ckpt-0" / f"tensor{i:05d}_000").write_bytes(b"pickle %d" % i)
    return root


def snapshot(path):
    return {
        str(p.relative_to(path)): p.read_bytes() if p.is_file() else None
        for p in sorted(path.rglob("*"))
    }


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("grok-1/ckpt-0", "grok-1/ckpt-0"),  # SRC SRC
        ("grok-1", "grok-1"),
        ("grok-1/ckpt-0", "grok-1/ckpt-0/out"),  # inside the source
        ("grok-1", "grok-1/ckpt-0"),  # the parent given, the pickles' folder as output
        ("grok-1/ckpt-0", "grok-1"),  # containing the source
        ("grok-1/ckpt-0", "link"),  # a symbolic link to the source
    ],
)
def test_convert_never_writes_over_its_input(ckpt, capsys, src, dst):
    base = ckpt.parent
    (base / "link").symlink_to(ckpt / "ckpt-0")
    before = snapshot(base)
    code = convert_cli.main([str(base / src), str(base / dst), "--overwrite"])
    assert code == 1
    assert "overlaps the checkpoint being converted" in one_line_error(capsys, "grok-convert")
    assert snapshot(base) == before


def test_convert_refuses_outputs_it_must_not_replace(ckpt, capsys, tmp_path):
    src = str(ckpt / "ckpt-0")
    regular = tmp_path / "notes.txt"
    regular.write_text("keep me")
    precious = tmp_path / "home"
    (precious / "docs").mkdir(parents=True)
    (precious / "docs" / "a.txt").write_text("keep me too")
    before = snapshot(tmp_path)
    cases = [
        ([src, str(regular), "--overwrite"], "exists and is not a folder"),
        ([src, str(regular / "out")], "cannot create the output folder"),  # under a file
        ([src, str(precious), "--overwrite"], "does not look like a checkpoint"),
        ([src, str(precious)], "already exists"),
    ]
    for argv, fragment in cases:
        assert convert_cli.main(argv) == 1, argv
        line = one_line_error(capsys, "grok-convert")
        assert fragment in line and argv[1] in line
    assert snapshot(tmp_path) == before  # no partial folder left behind either


def test_convert_read_only_destination(ckpt, capsys, tmp_path):
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro / "out"
    else:  # root writes through permissions; /sys refuses new folders even to root
        out = Path("/sys/grok-convert-test/out")
        try:
            out.parent.mkdir()
        except OSError:
            pass
        else:
            out.parent.rmdir()
            pytest.skip("no read-only folder on this machine")
    assert convert_cli.main([str(ckpt), str(out)]) == 1
    line = one_line_error(capsys, "grok-convert")
    assert "cannot create the output folder" in line and str(out) in line


@pytest.mark.parametrize(
    ("extra", "status", "fragment"),
    [
        (["--max-file-gb", "nan"], 2, "--max-file-gb: expected a finite number, got 'nan'"),
        (["--max-file-gb", "-1"], 2, "--max-file-gb: expected a number > 0, got '-1'"),
        (["--max-file-gb", "0"], 2, "got '0'"),
        (["--max-file-gb", "inf"], 2, "got 'inf'"),
        (["--config"], 2, "--config: expected one argument"),
        (["--config", "/nonexistent/config.json"], 1, "'/nonexistent/config.json' is neither"),
        (["--dtype", "int8"], 2, "invalid choice: 'int8'"),
    ],
)
def test_convert_bad_flags(ckpt, capsys, tmp_path, extra, status, fragment):
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    assert call(convert_cli.main, [str(ckpt), str(out), *extra]) == status
    assert fragment in one_line_error(capsys, "grok-convert")
    assert snapshot(tmp_path) == before


def test_convert_library_refuses_a_non_int_file_size(ckpt, tmp_path):
    from grok.grok1.convert import convert_grok1_checkpoint

    with pytest.raises(ConfigError, match="max_file_bytes"):
        convert_grok1_checkpoint(ckpt, tmp_path / "out", max_file_bytes=float("nan"))
    with pytest.raises(CheckpointError, match="overlaps"):
        convert_grok1_checkpoint(ckpt, ckpt, overwrite=True)


# The wrappers and the console scripts.

PROGRAMS = ["sample", "plan", "convert", "train", "train_tokenizer"]


def test_console_scripts_and_wrappers_name_the_same_programs():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    want = {f"grok-{p.replace('_', '-')}": f"grok.cli.{p}:main" for p in PROGRAMS}
    assert {**want, "grok-serve": "grok.serve.cli:main"} == scripts  # the server's own package
    for target in scripts.values():
        module, name = target.split(":")
        assert callable(getattr(importlib.import_module(module), name))
    for program in PROGRAMS:
        text = (ROOT / "scripts" / f"{program}.py").read_text()
        assert f"from grok.cli.{program} import main" in text and "sys.path" not in text


# The benchmarks' and the accelerator check's wrappers, and the package modules they run.
BENCH_PROGRAMS = {
    "benchmark": "grok.bench.benchmark",
    "bench_generate": "grok.bench.generate",
    "bench_kernels": "grok.bench.kernels",
    "device_check": "grok.bench.device_check",
    "bench_serve": "grok.bench.serve",
}
# bench_load carries its own code: its fresh-memory tries run the script again in processes
# that must not import JAX (the package's __init__ does).
NOT_YET_PACKAGED = {"bench_load"}


def test_bench_scripts_are_wrappers_of_the_package():
    for script, module in BENCH_PROGRAMS.items():
        text = (ROOT / "scripts" / f"{script}.py").read_text()
        assert f"from {module} import main" in text and "sys.path" not in text, script
        assert len(text.splitlines()) <= 10, script
        assert callable(importlib.import_module(module).main)
    scripts = {p.stem for p in (ROOT / "scripts").glob("*.py")}
    assert scripts - set(PROGRAMS) - set(BENCH_PROGRAMS) == NOT_YET_PACKAGED


def test_wrapper_runs_as_a_user_would():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    script = ROOT / "scripts" / "plan.py"
    bad = subprocess.run(
        [sys.executable, str(script), "--model", "0"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert (
        bad.stderr.strip()
        == "grok-plan: error: argument --model: expected an integer >= 1, got '0'"
    )


def test_train_programs_refuse_before_working(capsys, tmp_path):
    from grok.cli import train as train_cli
    from grok.cli import train_tokenizer as tok_cli

    assert train_cli.main(["--out", str(tmp_path), "--work", str(tmp_path / "w")]) == 1
    assert "tokenizer.tok.json: not found" in one_line_error(capsys, "grok-train")
    assert call(train_cli.main, ["--steps", "0"]) == 2
    assert "--steps: expected an integer >= 1, got '0'" in one_line_error(capsys, "grok-train")
    assert tok_cli.main(["--vocab-size", "200", "--out", str(tmp_path)]) == 2
    assert "--vocab-size 200" in one_line_error(capsys, "grok-train-tokenizer")
    assert call(tok_cli.main, ["--heldout-fraction", "nan"]) == 2
    assert "got 'nan'" in one_line_error(capsys, "grok-train-tokenizer")
    assert list(tmp_path.iterdir()) == []
