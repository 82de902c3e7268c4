"""Load benchmark: a ~2 GB checkpoint in the released layout, loaded vs read plainly.

    python scripts/bench_load.py [--dir /tmp/grok_bench] [--keep]

Writes (in a child process, so its memory does not count) a bf16 checkpoint of a config
sized to about 2 GB: -TP-common files plus 8 TP files with the experts split as released.
Then, on the same (page-cached) files:
  1. plain read: every file read start to end into one reused 64 MiB buffer -> GB/s;
  2. ``load_pretrained`` onto one device, then onto an 8-device ("data", "model") = (1, 8)
     CPU mesh -> GB/s and the ratio to the plain read;
  3. host memory of each load (run in its own process) sampled every 5 ms: peak RSS,
     split into anonymous and file-backed pages. On the CPU backend the "device" arrays
     live in host memory too, so the load's own overhead is peak RSS minus (RSS before +
     bytes of the loaded arrays).
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
from grok.sharding import make_mesh  # noqa: E402

GB = 1e9
READ_BUFFER = 64 << 20
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


def write(directory: Path) -> None:
    """Writes the checkpoint with random finite bf16 values (random bits, exponent capped)."""
    from grok.testing import write_checkpoint

    rng = np.random.default_rng(0)
    tensors = {}
    for spec in weight_specs(BENCH):
        for _, name in spec.hf_names():
            bits = rng.integers(0, 1 << 16, size=spec.hf_shape, dtype=np.uint16) & 0xBFFF
            tensors[name] = bits.view(jnp.bfloat16)  # |x| < 2: no inf or NaN
    write_checkpoint(directory, BENCH, tensors, tp=8, common_files=4)


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


def timed_load(directory: Path, mesh) -> dict:
    before = MemorySampler.now()
    with MemorySampler() as mem:
        start = time.perf_counter()
        model = load_pretrained(directory, dtype=jnp.bfloat16, mesh=mesh, quiet=True)
        jax.block_until_ready(model.params)
        seconds = time.perf_counter() - start
    leaves = jax.tree_util.tree_leaves(model.params)
    array_bytes = sum(s.data.nbytes for a in leaves for s in a.addressable_shards)
    largest_shard = max(s.data.nbytes for a in leaves for s in a.addressable_shards)
    for leaf in leaves:
        leaf.delete()
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
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    parser.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load-only", choices=["single", "mesh"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    directory = Path(args.dir)
    if args.write_only:
        write(directory)
        return 0
    if args.load_only:  # one load in a fresh process, so peak RSS is this load's alone
        mesh = make_mesh(1, 8) if args.load_only == "mesh" else None
        print(json.dumps(timed_load(directory, mesh)))
        return 0
    if not (directory / "config.json").exists():
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--dir", str(directory), "--write-only"], check=True
        )
        print(f"wrote {directory} in {time.perf_counter() - start:.1f} s")
    size = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    print(f"checkpoint: {size / GB:.2f} GB in {len(list(directory.glob('*.safetensors')))} files")

    plain_read(directory)  # warm the page cache so both measurements read from it
    nbytes, seconds = plain_read(directory)
    plain_rate = nbytes / seconds / GB
    print(f"plain read:            {plain_rate:6.2f} GB/s ({seconds:.2f} s)")
    for label, which in (("load, 1 device", "single"), ("load, mesh (1, 8)", "mesh")):
        child = [sys.executable, __file__, "--dir", str(directory), "--load-only", which]
        r = json.loads(subprocess.run(child, check=True, capture_output=True).stdout)
        rate = size / r["seconds"] / GB
        overhead = r["peak"]["VmRSS"] - r["before"]["VmRSS"] - r["array_bytes"]
        print(
            f"{label + ':':<22} {rate:6.2f} GB/s ({r['seconds']:.2f} s) = "
            f"{rate / plain_rate:.2f} x plain read"
        )
        print(
            f"  peak RSS {r['peak']['VmRSS'] / GB:.2f} GB = {r['peak']['VmRSS'] / size:.2f} x "
            f"checkpoint (anon {r['peak']['RssAnon'] / GB:.2f} GB, file-backed "
            f"{r['peak']['RssFile'] / GB:.2f} GB); RSS before {r['before']['VmRSS'] / GB:.2f} GB; "
            f"loaded arrays {r['array_bytes'] / GB:.2f} GB (host memory on the CPU backend)"
        )
        print(
            f"  load overhead above the arrays: {overhead / GB:.3f} GB = "
            f"{overhead / size:.3f} x checkpoint; largest device shard "
            f"{r['largest_shard'] / GB:.3f} GB"
        )
    if not args.keep:
        shutil.rmtree(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
