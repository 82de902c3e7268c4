"""Load benchmark: ~2 GB checkpoints in the released layout, loaded vs read plainly.

    python scripts/bench_load.py [--dir /tmp/grok_bench] [--kinds bf16,fp8-scale,fp8-block]

Writes (in a child process, so its memory does not count) checkpoints of a config sized to
about 1e9 parameters: -TP-common files plus 8 TP files with the experts split as released.
``bf16``: every tensor bfloat16 (2.0 GB). ``fp8-scale`` / ``fp8-block``: every matrix but the
router float8_e4m3fn with a per-output-channel ``_scale`` / 128x128-block ``_scale_inv``
(random finite codes and scales), the rest bfloat16 (1.1 GB). Then, per kind, on the same
(page-cached) files:
  1. plain read: every file read start to end into one reused 64 MiB buffer -> GB/s (the
     target's reference); and copied into new memory kept allocated, by every core: on the
     CPU backend, whose arrays are host memory, no load can beat that;
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from grok.api import load_pretrained  # noqa: E402
from grok.params import weight_specs  # noqa: E402
from grok.presets import TINY_GROK2  # noqa: E402
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
# About 2.3e7 parameters (45 MB in bf16): ``--small``, to check that the script runs.
SMALL = BENCH.replace(
    vocab_size=4096,
    hidden_size=512,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    intermediate_size=1024,
    moe_intermediate_size=1024,  # 8 blocks of 128: one per TP rank with fp8-block
    embedding_multiplier_scale=512**0.5,
)


def write(directory: Path, kind: str, config=BENCH) -> None:
    """Writes the checkpoint with random finite values (random bits, exponent capped)."""
    from grok.checkpoint import write_checkpoint
    from grok.checkpoint.writer import save_file

    rng = np.random.default_rng(0)
    tensors, scales = {}, {}
    for spec in weight_specs(config):
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
    write_checkpoint(directory, config, tensors, tp=8, common_files=4)
    if scales:  # each TP rank's slice of an expert weight carries its own scales
        specs = {n: s for s in weight_specs(config) for _, n in s.hf_names()}
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


def copy_into_new_memory(directory: Path) -> tuple[int, float]:
    """Every file copied into new memory that stays allocated to the end: a CPU-backend load's
    floor, since its arrays are such memory (page faults included; memory freed and taken
    again, as a file-by-file read into throwaway arrays does, would hide them). One thread
    per core over the loader's copy units, into its own kind of buffer (``aligned_empty``)."""
    from grok.checkpoint.staging import aligned_empty
    from grok.checkpoint.units import UNIT_BYTES as unit

    kept, jobs = [], []
    start = time.perf_counter()
    for path in sorted(directory.glob("*.safetensors")):
        source = np.memmap(path, dtype=np.uint8, mode="r")
        target = aligned_empty(source.shape, np.dtype(np.uint8))
        kept.append(target)
        jobs += [(target, source, i) for i in range(0, source.size, unit)]

    def copy(job) -> None:
        target, source, i = job
        target[i : i + unit] = source[i : i + unit]

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(copy, jobs))
    seconds = time.perf_counter() - start
    return sum(k.nbytes for k in kept), seconds


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
    device = jax.devices()[0]
    return {
        "seconds": seconds,
        "before": before,
        "peak": dict(mem.peak),
        "array_bytes": array_bytes,
        # The CPU backend's arrays are host memory: not overhead. An accelerator's are not.
        "host_array_bytes": array_bytes if device.platform == "cpu" else 0,
        "largest_shard": largest_shard,
        "device": device.device_kind,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/grok_bench_ckpt")
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help="comma-separated, of " + ", ".join(KINDS)
    )
    parser.add_argument(
        "--loads", default="single,mesh", help="comma-separated, of single (one device), mesh"
    )
    parser.add_argument("--small", action="store_true", help="a 45 MB checkpoint (smoke test)")
    parser.add_argument("--json", help="also write the figures here, as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    parser.add_argument("--write-only", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--load-only", choices=["single", "mesh"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.dir)
    if args.write_only:
        write(root, args.write_only, SMALL if args.small else BENCH)
        return 0
    if args.load_only:  # one load in a fresh process, so peak memory is this load's alone
        mesh = make_mesh(1, 8) if args.load_only == "mesh" else None
        print(json.dumps(timed_load(root, mesh)))
        return 0
    report = {"load_average_before": os.getloadavg()[:2], "small": args.small, "kinds": {}}
    print(f"uptime: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (1, 5 min load average)")
    for kind in args.kinds.split(","):
        directory = root / kind
        if not (directory / "config.json").exists():
            start = time.perf_counter()
            cmd = [sys.executable, __file__, "--dir", str(directory), "--write-only", kind]
            subprocess.run(cmd + (["--small"] if args.small else []), check=True)
            print(f"wrote {directory} in {time.perf_counter() - start:.1f} s")
        files = list(directory.glob("*.safetensors"))
        size = sum(p.stat().st_size for p in files)
        print(f"\n[{kind}] checkpoint: {size / GB:.2f} GB in {len(files)} files")
        plain_read(directory)  # warm the page cache so both measurements read from it
        nbytes, seconds = plain_read(directory)
        plain_rate = nbytes / seconds / GB
        print(f"plain read:            {plain_rate:6.2f} GB/s ({seconds:.2f} s)")
        nbytes, seconds = copy_into_new_memory(directory)
        new_rate = nbytes / seconds / GB
        print(f"copy into new memory:  {new_rate:6.2f} GB/s ({seconds:.2f} s), kept allocated")
        figures = {"bytes": size, "plain_read_gb_s": plain_rate, "new_memory_copy_gb_s": new_rate}
        for which in args.loads.split(","):
            label = {"single": "load, 1 device", "mesh": "load, mesh (1, 8)"}[which]
            child = [sys.executable, __file__, "--dir", str(directory), "--load-only", which]
            r = json.loads(subprocess.run(child, check=True, capture_output=True).stdout)
            rate = size / r["seconds"] / GB
            anon = r["peak"]["RssAnon"] - r["before"]["RssAnon"] - r["host_array_bytes"]
            target = r["largest_shard"] + 0.05 * size
            print(
                f"{label + ':':<22} {rate:6.2f} GB/s ({r['seconds']:.2f} s) = "
                f"{rate / plain_rate:.2f} x plain read, {rate / new_rate:.2f} x new-memory copy"
            )
            print(
                f"  host anonymous memory above the loaded arrays "
                f"({r['array_bytes'] / GB:.2f} GB on {r['device']}): {anon / GB:.3f} GB; target "
                f"<= largest shard {r['largest_shard'] / GB:.3f} GB + 5% of the checkpoint = "
                f"{target / GB:.3f} GB ({'met' if anon <= target else 'NOT met'}); peak "
                f"file-backed {r['peak']['RssFile'] / GB:.2f} GB"
            )
            figures[which] = {
                "seconds": r["seconds"],
                "gb_s": rate,
                "of_plain_read": rate / plain_rate,
                "of_new_memory_copy": rate / new_rate,
                "host_overhead_bytes": anon,
                "host_overhead_target_bytes": target,
                "device": r["device"],
            }
        report["kinds"][kind] = figures
    print(f"uptime: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (1, 5 min load average)")
    report["load_average_after"] = os.getloadavg()[:2]
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
