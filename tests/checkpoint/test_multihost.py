"""Several processes, one mesh: 2 processes x 4 CPU devices on localhost, as two hosts would.

The test starts this file twice as a worker
(``python tests/checkpoint/test_multihost.py worker ...``), one process per simulated host,
each with 4 CPU devices. Each worker:

1. runs ``grok-sample`` (``grok.cli.sample.main``) on two prompts with ``--coordinator``,
   ``--num-processes``, ``--process-id`` and ``--mesh 2x4``: this joins the two processes
   through ``distributed.initialize`` (gloo collectives between CPU devices) and
   generates on a ("data", "model") = (2, 4) mesh with one data row (and one prompt's KV
   cache) per process; only process 0 prints;
2. loads the same checkpoint onto the same mesh and generates the same prompts through
   ``Model.generate`` with a streaming callback (the CLI's compiled programs are reused);
3. loads it again onto a (2, 4) mesh whose ``model`` axis spans both processes (each
   process holds two of the four model shards, so every layer's sums cross processes),
   counting the bytes it reads from the safetensors files, and computes logits there;
4. writes everything to a file for the test.

The test then checks both processes against one process on one device: the same logits,
tokens and streamed tokens, and the CLI's text; and that each process read exactly its own
devices' slices (half of every weight split over ``model``, the replicated ones whole).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import grok
from grok import distributed
from grok.bench.harness import free_port
from grok.checkpoint.units import Copier
from grok.cli import sample as cli
from grok.presets import TINY_GROK2
from grok.sharding import make_mesh
from grok.testing import write_checkpoint
from grok.tokenizer import load_tokenizer, write_tok_json

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = 2
DEVICES_PER_PROCESS = 4
# 3 special tokens, then the 256 bytes: every text encodes (one token per byte); reserved
# specials fill the rest of the vocab, so every id the model can emit decodes.
CONFIG = TINY_GROK2.replace(vocab_size=264)
SPECIALS = {
    "<|pad|>": 0,
    "<|separator|>": 1,
    "<|eos|>": 2,
    **{f"<|reserved_{i}|>": 259 + i for i in range(264 - 259)},
}
STORED_ITEMSIZE = 4  # the checkpoint is written in float32
LOGIT_TOKENS = np.array([[5, 17, 200, 31, 9, 44], [100, 3, 3, 7, 250, 1]], np.int32)  # [B, T]
TEXTS = ["Hello there", "Good day"]  # at most 12 tokens: one 16-token bucket with 4 new ones
MAX_NEW = 4
CLI_ARGS = [
    *[a for t in TEXTS for a in ("--prompt", t)],
    *("--max-new-tokens", str(MAX_NEW), "--dtype", "float32"),
]
WORKER_TIMEOUT_S = 240


def cli_main(args: list[str]) -> tuple[int, str]:
    """Runs ``grok-sample`` in this process: (exit status, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(args)
    return status, out.getvalue()


def count_reads() -> tuple[list[int], Callable[[], None]]:
    """Counts the bytes of tensor data this process copies out of the checkpoint files.

    The counter wraps the one method through which the checkpoint reader takes a tensor
    region out of a file: ``Copier.copy(part, dst)`` (``grok.checkpoint.units``, called from
    a thread pool, hence the lock). Returns (the running total in a list, a function that
    unwraps).
    """
    total, lock = [0], threading.Lock()

    def add(nbytes: int) -> None:
        with lock:
            total[0] += nbytes

    original = Copier.copy

    def copy(self, part, dst):
        original(self, part, dst)
        add(dst.size * part.entry.dtype.itemsize)

    Copier.copy = copy
    return total, lambda: setattr(Copier, "copy", original)


def local_shard_bytes(params) -> int:
    """Bytes of this process's distinct parameter shards, at the stored itemsize."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(params):
        indices = leaf.sharding.addressable_devices_indices_map(leaf.shape).values()
        keys = {
            tuple(s.indices(n) for s, n in zip(index, leaf.shape, strict=True)) for index in indices
        }
        total += sum(int(np.prod([len(range(*k)) for k in key])) for key in keys)
    return total * STORED_ITEMSIZE


def prompts(checkpoint: str | Path) -> list[list[int]]:
    """TEXTS as the CLI encodes them."""
    tokenizer = load_tokenizer(Path(checkpoint))
    return [tokenizer.encode(t) for t in TEXTS]


class CompileLog(logging.Handler):
    """Names of the functions JAX compiles while ``jax_log_compiles`` is on."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = re.match(r"Compiling jit\((\w+)\)", record.getMessage())
        if match:
            self.names.append(match.group(1))


def worker(process_id: int, port: int, checkpoint: str, out_dir: str) -> None:
    """One simulated host (see the module docstring)."""
    compiles = CompileLog()
    logging.getLogger("jax").addHandler(compiles)
    jax.config.update("jax_log_compiles", True)
    status, cli_out = cli_main(
        [
            *CLI_ARGS,
            *("--checkpoint", checkpoint, "--mesh", "2x4"),
            *("--coordinator", f"localhost:{port}", "--num-processes", str(PROCESSES)),
            *("--process-id", str(process_id)),
        ]
    )
    assert jax.process_count() == PROCESSES and jax.device_count() == 8
    assert distributed.initialize(f"localhost:{port}", PROCESSES, process_id)  # joined already

    model = grok.load_pretrained(checkpoint, dtype=jnp.float32, mesh=make_mesh(2, 4), quiet=True)
    streamed: list[list[int]] = [[] for _ in TEXTS]
    result = model.generate(
        prompts(checkpoint),
        max_new_tokens=MAX_NEW,
        on_token=lambda row, token: streamed[row].append(token),
    )
    jax.config.update("jax_log_compiles", False)

    # Model axis across the processes: row r holds devices 2r, 2r+1 of each process.
    by_process = [
        [d for d in jax.devices() if d.process_index == p] for p in range(PROCESSES)
    ]  # [process][local device]
    grid = [by_process[p][2 * r + c] for r in range(2) for p in range(2) for c in range(2)]
    read, _ = count_reads()
    spanning = grok.load_pretrained(
        checkpoint, dtype=jnp.float32, mesh=make_mesh(2, 4, grid), quiet=True
    )
    read_bytes = read[0]
    logits = distributed.to_host(spanning.logits(LOGIT_TOKENS))  # [B, T, V]

    np.save(Path(out_dir) / f"logits{process_id}.npy", logits)
    report = {
        "cli_status": status,
        "cli_out": cli_out,
        "read_bytes": read_bytes,
        "expected_bytes": local_shard_bytes(spanning.params),
        "tokens": result.tokens,
        "streamed": streamed,
        "finish_reasons": result.finish_reasons,
        "compiles": compiles.names,
    }
    (Path(out_dir) / f"report{process_id}.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("multihost_ckpt")
    write_checkpoint(path, CONFIG, 3, tp=4)
    write_tok_json(path / "tokenizer.tok.json", {bytes([b]): 3 + b for b in range(256)}, SPECIALS)
    return path


def one_device(checkpoint: Path) -> dict:
    """One process, one device: the bytes its load reads, logits, a generation, the CLI."""
    read, unwrap = count_reads()
    try:
        model = grok.load_pretrained(checkpoint, dtype=jnp.float32, quiet=True)
        read_bytes = read[0]
    finally:
        unwrap()
    return {
        "read_bytes": read_bytes,
        "logits": np.asarray(model.logits(LOGIT_TOKENS)),
        "result": model.generate(prompts(checkpoint), max_new_tokens=MAX_NEW),
        "cli": cli_main([*CLI_ARGS, "--checkpoint", str(checkpoint)]),
    }


@pytest.fixture(scope="module")
def runs(checkpoint, tmp_path_factory):
    """Starts the two workers, computes the one-device run meanwhile (the workers spend much
    of their time waiting on each other), then collects the workers' reports.

    Returns (one-device results, [(report, logits)] per process).
    """
    from conftest import FAST_COMPILE_FLAGS  # not at the top: this file is also the worker

    out_dir = tmp_path_factory.mktemp("multihost_out")
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{FAST_COMPILE_FLAGS} "
        f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    port = free_port("localhost")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "worker", str(i), str(port), str(checkpoint), str(out_dir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(PROCESSES)
    ]
    logs = []
    try:
        single = one_device(checkpoint)
        for p in procs:
            logs.append(p.communicate(timeout=WORKER_TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"worker {i} failed:\n{logs[i][-4000:]}"
    reports = [
        (
            json.loads((out_dir / f"report{i}.json").read_text()),
            np.load(out_dir / f"logits{i}.npy"),
        )
        for i in range(PROCESSES)
    ]
    return single, reports


@pytest.mark.slow
def test_logits_and_generation_equal_one_device(runs):
    single, reports = runs
    for report, logits in reports:
        np.testing.assert_allclose(logits, single["logits"], rtol=1e-5, atol=1e-5)
        assert report["tokens"] == single["result"].tokens
        assert report["finish_reasons"] == single["result"].finish_reasons
        assert report["streamed"] == single["result"].tokens  # on_token ran on every process
        # The CLI's batch and the streamed calls share one prefill and one decode program:
        # the decode state keeps one layout from call to call.
        assert report["compiles"].count("_prefill") == report["compiles"].count("_decode") == 1
    assert all(len(t) == MAX_NEW for t in single["result"].tokens)  # no early stop


@pytest.mark.slow
def test_each_process_reads_only_its_own_slices(runs, checkpoint):
    single, reports = runs
    whole = single["read_bytes"]  # one device reads every tensor once
    stored = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    assert 0.9 * stored < whole < stored  # the counter sees the weights (files add headers)
    for report, _ in reports:
        assert report["read_bytes"] == report["expected_bytes"]
        # Half of each model-split weight is elsewhere; replicated ones are read whole.
        assert report["read_bytes"] < 0.75 * whole


@pytest.mark.slow
def test_cli_prints_once_and_matches_one_process(runs):
    single, reports = runs
    status, expected = single["cli"]
    assert status == 0 and expected.strip()
    (first, _), (second, _) = reports
    assert first["cli_status"] == second["cli_status"] == 0
    assert first["cli_out"] == expected
    assert second["cli_out"] == ""  # process 1 computed the same text and printed nothing


@pytest.mark.parametrize(
    ("kwargs", "environ", "fragment"),
    [
        ({"coordinator": "localhost", "num_processes": 2, "process_id": 0}, {}, "HOST:PORT"),
        ({"coordinator": "host:70000", "num_processes": 2, "process_id": 0}, {}, "HOST:PORT"),
        ({"coordinator": "host:1234", "num_processes": 0, "process_id": 0}, {}, ">= 1"),
        ({"coordinator": "host:1234", "num_processes": 2, "process_id": 2}, {}, r"\[0, 2\)"),
        ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES"),
        ({"coordinator": "h:1"}, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "-1"}, "outside"),
    ],
)
def test_initialize_rejects_bad_settings_before_joining(kwargs, environ, fragment):
    with pytest.raises(grok.ConfigError, match=fragment):
        distributed.initialize(**kwargs, environ=environ)


def test_initialize_after_jax_has_started_is_a_config_error():
    jax.devices()  # the backend is up: too late to join other processes
    with pytest.raises(grok.ConfigError, match="before any JAX calls"):
        distributed.initialize("localhost:1234", 2, 0, environ={})


def test_initialize_alone_is_a_no_op():
    assert distributed.initialize(environ={}) is False
    assert distributed.initialize(num_processes=1, environ={}) is False
    assert jax.process_count() == 1


def test_to_global_and_back_on_one_process():
    mesh = make_mesh(2, 4)
    value = np.arange(32, dtype=np.int32).reshape(4, 8)
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "model"))
    array = distributed.to_global(value, split)
    assert array.sharding == split and array.addressable_shards[0].data.shape == (2, 2)
    np.testing.assert_array_equal(distributed.to_host(array), value)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
