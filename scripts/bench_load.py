"""Load benchmark: ~2 GB checkpoints in the released layout, loaded vs read plainly.

    python scripts/bench_load.py [--dir /tmp/grok_bench] [--kinds bf16,fp8-scale,fp8-block]

Writes (in a child process, so its memory does not count) checkpoints of a config sized to
about 1e9 parameters: -TP-common files plus 8 TP files with the experts split as released.
``bf16``: every tensor bfloat16 (2.0 GB). ``fp8-scale`` / ``fp8-block``: every matrix but the
router float8_e4m3fn with a per-output-channel ``_scale`` / 128x128-block ``_scale_inv``
(random finite codes and scales), the rest bfloat16 (1.1 GB). Then, per kind, on the same
(page-cached) files:
  1. plain read: every file read start to end into one reused 64 MiB buffer -> GB/s (the
     target's reference), and into newly allocated memory, as any load must write it;
  2. ``load_pretrained`` (bfloat16) onto one device, then onto an 8-device ("data", "model")
     = (1, 8) CPU mesh, each in a fresh process (the JAX backend started before the clock)
     -> GB/s of file bytes, and the ratio to the plain read;
  3. host memory of each load sampled every 5 ms. On the CPU backend the "device" arrays
     live in host memory too, so the load's overhead is the peak anonymous memory minus
     (anonymous memory before + bytes of the loaded arrays), checked against the target:
     the largest device shard + 5% of the checkpoint.

Measured figures go in the README ("Loading"), with ``uptime``'s load average: the numbers
move with whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from grok.api import load_pretrained  # noqa: E402
from grok.config import TINY_GROK2  # noqa: E402
from grok.params import weight_specs  # noqa: E402
from grok.quant import FP8_BLOCK  # noqa: E402
from grok.sharding import make_mesh  # noqa: E402

GB = 1e9
READ_BUFFER = 64 << 20
KINDS = ("bf16", "fp8-scale", "fp8-block")
# About 1.0e9 parameters: 2.0 GB in bf16. Grok-2's proportions, scaled down.
BENCH = TINY_GROK2.replace(
    vocab_size=32768,
    hidden_size=2048,
    num_hidden_layers=6,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=4096,
    moe_intermediate_size=2048,
    embedding_multiplier_scale=2048**0.5,
)


def write(directory: Path, kind: str) -> None:
    """Writes the checkpoint with random finite values (random bits, exponent capped)."""
    from grok.checkpoint import write_checkpoint
    from grok.checkpoint.writer import save_file

    rng = np.random.default_rng(0)
    tensors, scales = {}, {}
    for spec in weight_specs(BENCH):
        for _, name in spec.hf_names():
            shape = spec.hf_shape
            if kind != "bf16" and spec.quantized:
                bits = rng.integers(0, 1 << 8, size=shape, dtype=np.uint8) & 0xF7  # no NaN
                tensors[name] = bits.view(jnp.float8_e4m3fn)
                grid = (-(-shape[0] // FP8_BLOCK), -(-shape[1] // FP8_BLOCK))
                suffix = "_scale" if kind == "fp8-scale" else "_scale_inv"
                size = shape[0] if kind == "fp8-scale" else grid
                scales[name + suffix] = rng.uniform(1e-3, 2e-3, size).astype(np.float32)
                continue
            bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16) & 0xBFFF
            tensors[name] = bits.view(jnp.bfloat16)  # |x| < 2: no inf or NaN
    write_checkpoint(directory, BENCH, tensors, tp=8, common_files=4)
    if scales:  # each TP rank's slice of an expert weight carries its own scales
        specs = {n: s for s in weight_specs(BENCH) for _, n in s.hf_names()}
        common, ranks = {}, [{} for _ in range(8)]
        for name, s in scales.items():
            spec = specs[name.rsplit("_scale", 1)[0]]
            if spec.tp_dim is None:
                common[name] = s
            elif kind == "fp8-scale":  # per output row: w1/w3 split by rows, w2 whole
                for r, part in enumerate(np.split(s, 8) if spec.tp_dim == 0 else [s] * 8):
                    ranks[r][name] = part
            else:
                for r, part in enumerate(np.split(s, 8, axis=spec.tp_dim)):
                    ranks[r][name] = np.ascontiguousarray(part)
        save_file(directory / "pytorch_model-00010-TP-common.safetensors", common)
        for r, part in enumerate(ranks):  # beside the weights, in the same rank's file name
            save_file(directory / f"pytorch_model-{11 + r:05d}-TP-{r:03d}.safetensors", part)


class MemorySampler:
    """Peak VmRSS / RssAnon / RssFile of this process, sampled on a thread."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self, period: float = 0.005):
        self.period = period
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @classmethod
    def now(cls) -> dict[str, int]:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in cls.FIELDS:
                    out[key] = int(line.split()[1]) * 1024
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            for k, v in self.now().items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(self.period)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for k, v in self.now().items():
            self.peak[k] = max(self.peak[k], v)


def plain_read(directory: Path) -> tuple[int, float]:
    buffer = bytearray(READ_BUFFER)
    view = memoryview(buffer)
    total, start = 0, time.perf_counter()
    for path in sorted(directory.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total, time.perf_counter() - start


def fresh_read(directory: Path) -> tuple[int, float]:
    """Every file read into newly allocated memory, as a load must (page faults included)."""
    total, start = 0, time.perf_counter()
    for path in sorted(directory.glob("*.safetensors")):
        total += np.fromfile(path, dtype=np.uint8).nbytes
    return total, time.perf_counter() - start


def timed_load(directory: Path, mesh) -> dict:
    jax.devices()  # the backend starts before the clock, as the plain read's Python does
    before = MemorySampler.now()
    with MemorySampler() as mem:
        start = time.perf_counter()
        model = load_pretrained(directory, dtype=jnp.bfloat16, mesh=mesh, quiet=True)
        jax.block_until_ready(model.params)
        seconds = time.perf_counter() - start
    leaves = jax.tree_util.tree_leaves(model.params)
    array_bytes = sum(s.data.nbytes for a in leaves for s in a.addressable_shards)
    largest_shard = max(s.data.nbytes for a in leaves for s in a.addressable_shards)
    return {
        "seconds": seconds,
        "before": before,
        "peak": dict(mem.peak),
        "array_bytes": array_bytes,
        "largest_shard": largest_shard,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/grok_bench_ckpt")
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help="comma-separated, of " + ", ".join(KINDS)
    )
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    parser.add_argument("--write-only", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--load-only", choices=["single", "mesh"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.dir)
    if args.write_only:
        write(root, args.write_only)
        return 0
    if args.load_only:  # one load in a fresh process, so peak memory is this load's alone
        mesh = make_mesh(1, 8) if args.load_only == "mesh" else None
        print(json.dumps(timed_load(root, mesh)))
        return 0
    print(f"uptime: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (1, 5 min load average)")
    for kind in args.kinds.split(","):
        directory = root / kind
        if not (directory / "config.json").exists():
            start = time.perf_counter()
            cmd = [sys.executable, __file__, "--dir", str(directory), "--write-only", kind]
            subprocess.run(cmd, check=True)
            print(f"wrote {directory} in {time.perf_counter() - start:.1f} s")
        files = list(directory.glob("*.safetensors"))
        size = sum(p.stat().st_size for p in files)
        print(f"\n[{kind}] checkpoint: {size / GB:.2f} GB in {len(files)} files")
        plain_read(directory)  # warm the page cache so both measurements read from it
        nbytes, seconds = plain_read(directory)
        plain_rate = nbytes / seconds / GB
        print(f"plain read:            {plain_rate:6.2f} GB/s ({seconds:.2f} s)")
        nbytes, seconds = fresh_read(directory)
        print(f"read into new memory:  {nbytes / seconds / GB:6.2f} GB/s ({seconds:.2f} s)")
        for label, which in (("load, 1 device", "single"), ("load, mesh (1, 8)", "mesh")):
            child = [sys.executable, __file__, "--dir", str(directory), "--load-only", which]
            r = json.loads(subprocess.run(child, check=True, capture_output=True).stdout)
            rate = size / r["seconds"] / GB
            anon = r["peak"]["RssAnon"] - r["before"]["RssAnon"] - r["array_bytes"]
            target = r["largest_shard"] + 0.05 * size
            print(
                f"{label + ':':<22} {rate:6.2f} GB/s ({r['seconds']:.2f} s) = "
                f"{rate / plain_rate:.2f} x plain read"
            )
            print(
                f"  anonymous memory above the loaded arrays ({r['array_bytes'] / GB:.2f} GB): "
                f"{anon / GB:.3f} GB; target <= largest shard {r['largest_shard'] / GB:.3f} GB "
                f"+ 5% of the checkpoint = {target / GB:.3f} GB "
                f"({'met' if anon <= target else 'NOT met'}); peak file-backed "
                f"{r['peak']['RssFile'] / GB:.2f} GB"
            )
    print(f"uptime: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (1, 5 min load average)")
    if not args.keep:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
