"""Load benchmark: ~2 GB checkpoints in the released layout, loaded vs fresh memory filled.

    python scripts/bench_load.py [--dir /tmp/grok_bench] [--kinds bf16,fp8-scale,fp8-block]

Writes (in a child process, so its memory does not count) checkpoints of a config sized to
about 1e9 parameters: -TP-common files plus 8 TP files with the experts split as released.
``bf16``: every tensor bfloat16 (2.0 GB). ``fp8-scale`` / ``fp8-block``: every matrix but the
router float8_e4m3fn with a per-output-channel ``_scale`` / 128x128-block ``_scale_inv``
(random finite codes and scales), the rest bfloat16 (1.1 GB). Then, per kind, on the same
(page-cached) files:
  1. plain read: every file read start to end into one reused 64 MiB buffer -> GB/s;
  2. the fresh-memory floor: every file copied into new memory kept allocated, by 2 threads
     in the loader's 8 MiB units, each way of asking for memory (``grok.checkpoint.fresh``:
     4 KiB or huge pages, each unit's span populated first or not, numpy's own ``np.empty``)
     ``--tries`` times, alternating, each in a fresh process; the floor is the best try of
     the fastest way (the highest median; every try is printed). On the CPU backend, whose
     arrays are host memory, no load beats it by much;
  3. ``load_pretrained`` onto one device, then onto an 8-device ("data", "model") = (1, 8)
     CPU mesh, each in a fresh process (the JAX backend started before the clock), bfloat16
     (an FP8 checkpoint dequantised) and, for the FP8 kinds, ``quantize="fp8"`` (the codes
     kept) -> GB/s of file bytes, as a ratio to the floor (targets: 0.6 for bfloat16 and
     kept FP8, 0.4 for FP8 dequantised to bfloat16, which writes twice the bytes) and to
     the plain read;
  4. host memory of each load sampled every 5 ms. On the CPU backend the "device" arrays
     live in host memory too, so the load's overhead is the peak anonymous memory minus
     (anonymous memory before + bytes of the loaded arrays), checked against the target:
     the largest device shard + 5% of the checkpoint.

Measured figures go in docs/loading.md, with ``uptime``'s load average: the numbers move
with whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

# The fresh-memory floor: its ways and its child process, which needs no JAX (so that its
# process starts in a fraction of a second), hence before the heavy imports below.
# The ways of asking for new memory the floor is measured with (grok.checkpoint.fresh):
# name -> (huge pages, each unit's span populated before its copy); "numpy": np.empty.
FILL_METHODS = {
    "4k": (False, False),
    "4k+populate": (False, True),
    "huge": (True, False),
    "huge+populate": (True, True),
    "numpy": None,
}
FLOOR_THREADS = 2
GB = 1e9


def _fresh_module():
    """``grok.checkpoint.fresh`` loaded by itself (the package would import JAX)."""
    path = Path(__file__).resolve().parent.parent / "grok" / "checkpoint" / "fresh.py"
    spec = importlib.util.spec_from_file_location("grok_checkpoint_fresh", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fill_new_memory(directory: Path, method: str, unit: int) -> float:
    """Seconds to copy every file into new memory kept allocated to the end (page faults
    included), by ``FLOOR_THREADS`` threads in ``unit``-byte pieces (the loader's copy
    units), memory asked for as ``method`` (``FILL_METHODS``)."""
    fresh = _fresh_module()
    way = FILL_METHODS[method]
    kept, jobs = [], []
    start = time.perf_counter()
    for path in sorted(directory.glob("*.safetensors")):
        source = np.memmap(path, dtype=np.uint8, mode="r")
        if way is None:
            target = np.empty(source.shape, np.uint8)
        else:
            target = fresh.aligned_empty(source.shape, np.dtype(np.uint8), huge=way[0])
        kept.append(target)
        jobs += [(target, source, i) for i in range(0, source.size, unit)]

    def copy(job) -> None:
        target, source, i = job
        if way is not None and way[1]:
            fresh.populate(target[i : i + unit])
        target[i : i + unit] = source[i : i + unit]

    with ThreadPoolExecutor(FLOOR_THREADS) as pool:
        list(pool.map(copy, jobs))
    return time.perf_counter() - start


if __name__ == "__main__" and sys.argv[1:2] == ["--fill-only"]:  # one try, a fresh process
    _, _, root, method, unit = sys.argv
    print(fill_new_memory(Path(root), method, int(unit)))
    sys.exit(0)

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from grok.api import load_pretrained  # noqa: E402
from grok.params import weight_specs  # noqa: E402
from grok.presets import TINY_GROK2  # noqa: E402
from grok.quant import FP8_BLOCK  # noqa: E402
from grok.sharding import make_mesh  # noqa: E402

READ_BUFFER = 64 << 20
KINDS = ("bf16", "fp8-scale", "fp8-block")
TARGETS = {None: 0.6, "fp8": 0.6, "dequantised": 0.4}  # load / floor
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


def fresh_memory_floor(directory: Path, size: int, tries: int) -> tuple[str, float, dict]:
    """(the fastest way, its best GB/s, {way: [GB/s of each try]}): each way ``tries`` times,
    alternating, each try in a fresh process (as each load runs; one that follows another in
    the same process finds the memory just freed). The fastest way is the one with the
    highest median: huge pages are bimodal on the measuring VM (fast only right after huge
    pages were freed, see ``grok.checkpoint.fresh``), and the best single try of every way
    would be such a lucky one; every way's tries are printed beside it."""
    from grok.checkpoint.units import UNIT_BYTES

    rates: dict[str, list[float]] = {m: [] for m in FILL_METHODS}
    for t in range(tries):
        for method in FILL_METHODS if t % 2 == 0 else list(FILL_METHODS)[::-1]:
            child = [sys.executable, __file__, "--fill-only", str(directory), method]
            child.append(str(UNIT_BYTES))
            out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
            rates[method].append(size / float(out) / GB)
    fastest = max(rates, key=lambda m: float(np.median(rates[m])))
    return fastest, max(rates[fastest]), rates


def timed_load(directory: Path, mesh, quantize: str | None) -> dict:
    jax.devices()  # the backend starts before the clock, as the plain read's Python does
    before = MemorySampler.now()
    with MemorySampler() as mem:
        start = time.perf_counter()
        model = load_pretrained(
            directory, dtype=jnp.bfloat16, mesh=mesh, quantize=quantize, quiet=True
        )
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
        "quant": model.quant,
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
    parser.add_argument(
        "--tries", type=int, help="tries of each way of filling new memory (3; --small: 1)"
    )
    parser.add_argument("--small", action="store_true", help="a 45 MB checkpoint (smoke test)")
    parser.add_argument("--json", help="also write the figures here, as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    parser.add_argument("--write-only", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--load-only", choices=["single", "mesh"], help=argparse.SUPPRESS)
    parser.add_argument("--quantize", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.tries = args.tries or (1 if args.small else 3)
    root = Path(args.dir)
    if args.write_only:
        write(root, args.write_only, SMALL if args.small else BENCH)
        return 0
    if args.load_only:  # one load in a fresh process, so peak memory is this load's alone
        mesh = make_mesh(1, 8) if args.load_only == "mesh" else None
        print(json.dumps(timed_load(root, mesh, args.quantize)))
        return 0
    report = {"load_average_before": os.getloadavg()[:2], "small": args.small, "kinds": {}}
    print(f"uptime: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (1, 5 min load average)")
    for kind in args.kinds.split(","):
        report["kinds"][kind] = bench_kind(root / kind, kind, args)
    print(f"uptime: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (1, 5 min load average)")
    report["load_average_after"] = os.getloadavg()[:2]
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(root)
    return 0


def bench_kind(directory: Path, kind: str, args: argparse.Namespace) -> dict:
    """One kind's checkpoint (written if absent): plain read, floor, loads; its figures."""
    if not (directory / "config.json").exists():
        start = time.perf_counter()
        cmd = [sys.executable, __file__, "--dir", str(directory), "--write-only", kind]
        subprocess.run(cmd + (["--small"] if args.small else []), check=True)
        print(f"wrote {directory} in {time.perf_counter() - start:.1f} s")
    files = list(directory.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in files)
    print(f"\n[{kind}] checkpoint: {size / GB:.2f} GB in {len(files)} files")
    plain_read(directory)  # warm the page cache so every measurement reads from it
    nbytes, seconds = plain_read(directory)
    plain_rate = nbytes / seconds / GB
    print(f"plain read:                 {plain_rate:6.2f} GB/s ({seconds:.2f} s)")
    method, floor, rates = fresh_memory_floor(directory, size, args.tries)
    for m, r in rates.items():
        every = " ".join(f"{x:.2f}" for x in r)
        line = f"best {max(r):5.2f}, median {np.median(r):5.2f} GB/s; all {every}"
        print(f"  new memory, {m + ':':<14} {line}")
    how = f"{method}: the highest median, its best of {args.tries}, {FLOOR_THREADS} threads"
    print(f"fresh-memory floor:         {floor:6.2f} GB/s ({how})")
    figures = {"bytes": size, "plain_read_gb_s": plain_rate, "floor_gb_s": floor}
    figures |= {"new_memory_copy_gb_s": floor, "floor_method": method, "fill_gb_s": rates}
    quantizes = [None] if kind == "bf16" else [None, "fp8"]
    for which in args.loads.split(","):
        for quantize in quantizes:
            label = {"single": "1 device", "mesh": "mesh (1, 8)"}[which]
            target = TARGETS[quantize if kind == "bf16" or quantize else "dequantised"]
            child = [sys.executable, __file__, "--dir", str(directory), "--load-only", which]
            child += ["--quantize", quantize] if quantize else []
            r = json.loads(subprocess.run(child, check=True, capture_output=True).stdout)
            rate = size / r["seconds"] / GB
            what = "bf16" if kind == "bf16" else (f"kept {r['quant']}" if quantize else "to bf16")
            print(
                f"load, {label}, {what + ':':<16} {rate:6.2f} GB/s ({r['seconds']:.2f} s) = "
                f"{rate / floor:.2f} x floor (target {target}: "
                f"{'met' if rate >= target * floor else 'NOT met'}), "
                f"{rate / plain_rate:.2f} x plain read"
            )
            anon = r["peak"]["RssAnon"] - r["before"]["RssAnon"] - r["host_array_bytes"]
            limit = r["largest_shard"] + 0.05 * size
            print(
                f"  host anonymous memory above the loaded arrays "
                f"({r['array_bytes'] / GB:.2f} GB on {r['device']}): {anon / GB:.3f} GB; target "
                f"<= largest shard {r['largest_shard'] / GB:.3f} GB + 5% of the checkpoint = "
                f"{limit / GB:.3f} GB ({'met' if anon <= limit else 'NOT met'}); peak "
                f"file-backed {r['peak']['RssFile'] / GB:.2f} GB"
            )
            figures[which if quantize is None else f"{which}-{quantize}"] = {
                "seconds": r["seconds"],
                "gb_s": rate,
                "of_floor": rate / floor,
                "of_new_memory_copy": rate / floor,
                "target_of_floor": target,
                "of_plain_read": rate / plain_rate,
                "host_overhead_bytes": anon,
                "host_overhead_target_bytes": limit,
                "device": r["device"],
                "quant": r["quant"],
            }
    return figures


if __name__ == "__main__":
    sys.exit(main())
