"""``scripts/device_check.py`` (``grok.bench.device_check``) on the CPU with reduced widths, so
the accelerator check cannot rot between the runs on a real device: the command runs end to
end and its JSON holds every figure, and its test step runs pytest and reads the outcome."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grok.bench import device_check
from grok.bench.device_costs import FULL_SHAPES, expected_experts, layers_for_memory

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "device_check.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check") / "device.json"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    args = ["--small", "--tests", "none", "--repeats", "1", "--prefill", "64"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--decode-batches", "8", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == json.loads(out.read_text())
    return json.loads(out.read_text())


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_small_run_reports_every_figure(report):
    assert report["platform"] == "cpu" and report["small"] is True
    assert report["tests"] == {"skipped": "--tests none"}
    loading = report["loading"]
    assert loading["small"] is True and list(loading["kinds"]) == ["bf16"], loading
    bf16 = loading["kinds"]["bf16"]
    assert _positive(bf16["plain_read_gb_s"]) and _positive(bf16["new_memory_copy_gb_s"])
    assert bf16["single"]["device"] == "cpu" and "mesh" not in bf16
    assert _positive(bf16["single"]["gb_s"]) and _positive(bf16["single"]["of_plain_read"])
    assert _positive(report["copy_bandwidth_bytes_per_s"])
    assert _positive(report["bf16_matmul_flops_per_s"])
    assert report["model"]["layers"] == 2  # the small run's fixed depth
    paths = report["moe_prefill_paths"]
    assert [(p["path"], p["tokens"]) for p in paths] == [("ragged", 64), ("blocks", 64)]
    assert all(_positive(p["seconds"]) and _positive(p["of_matmul_rate"]) for p in paths)
    assert [run["quantize"] for run in report["runs"]] == [None, "fp8"]
    bf16, fp8 = report["runs"]
    assert fp8["param_bytes"] < 0.75 * bf16["param_bytes"]  # float8 matrices
    for run in report["runs"]:
        (prefill,) = run["prefill"]
        (decode,) = run["decode"]
        assert prefill["tokens"] == 64 and decode["batch"] == 8
        for figure in (prefill, decode):
            assert "error" not in figure and "skipped" not in figure, figure
            for key in ("seconds", "flops", "bytes", "of_matmul_rate", "of_copy_bandwidth"):
                assert _positive(figure[key]), (key, figure)
        assert 7 < decode["expected_experts_per_layer"] < 8


def test_expected_experts_and_layers_for_memory():
    assert expected_experts(1, 8, 2) == 2
    assert expected_experts(64, 8, 2) == pytest.approx(8, abs=1e-6)
    # One H200 (about 139 GiB): bf16 Grok-2 layers are ~8.4 GB each, so about a dozen fit.
    assert 10 <= layers_for_memory(FULL_SHAPES, 139 << 30, None) <= 16
    assert layers_for_memory(FULL_SHAPES, None, None) == 2


def test_test_step_runs_pytest_and_reads_the_outcome(tmp_path):
    for module in device_check.DEVICE_TEST_MODULES:
        assert (ROOT / module).is_file(), module
    probe = tmp_path / "test_probe.py"
    probe.write_text("def test_ok():\n    assert True\n\n\ndef test_bad():\n    assert False\n")
    result = device_check.run_tests([str(probe)])
    assert result["passed"] == 1 and result["failed"] == 1 and result["returncode"] == 1
    assert any("test_bad" in line for line in result["failures"])


def test_a_case_past_the_budget_or_failing_is_recorded():
    def fails(_: int) -> dict:
        raise MemoryError("out of device memory")

    assert device_check._case(lambda n: {"n": n}, 3, deadline=float("inf")) == {"n": 3}
    assert "skipped" in device_check._case(lambda n: {"n": n}, 3, deadline=0.0)
    assert device_check._case(fails, 3, deadline=float("inf")) == {
        "error": "MemoryError: out of device memory"
    }
