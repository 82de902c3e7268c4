"""``grok-convert``: Grok-1's released ``ckpt-0`` pickles -> a safetensors checkpoint.

    grok-convert /data/grok-1/ckpt-0 /data/grok-1-safetensors [--dtype bfloat16]
        [--config grok1 | --config path/to/config.json] [--max-file-gb 4] [--overwrite]

The output folder holds ``pytorch_model-000NN-TP-common.safetensors`` files with the tensor
names the Grok-2 release uses, and a ``config.json`` with the Grok-1 settings. Load it with
``grok.load_pretrained(out_dir, mesh=...)``: memory-mapped, sharded, no pickle. The output is
written into a hidden folder beside the target and renamed into place only when complete; an
output folder that is, contains or lies inside the input is refused (see
``grok.grok1.convert.convert_grok1_checkpoint``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from grok.cli.common import Parser, positive_float, run_program
from grok.grok1.convert import OUTPUT_DTYPES, convert_grok1_checkpoint
from grok.presets import PRESETS, resolve_config

PROG = "grok-convert"
GIB = 2**30


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``grok-convert``."""
    p = Parser(prog=PROG, description="Convert Grok-1's ckpt-0 pickles to safetensors.")
    p.add_argument("ckpt_dir", help="the Grok-1 ckpt-0 folder (or the folder holding it)")
    p.add_argument("out_dir", help="the safetensors folder to create")
    p.add_argument("--dtype", choices=sorted(OUTPUT_DTYPES), default="bfloat16")
    p.add_argument(
        "--config",
        default=None,
        help=f"a preset ({', '.join(sorted(PRESETS))}) or a config.json path; "
        "default: a config.json beside the checkpoint, else grok1",
    )
    p.add_argument(
        "--max-file-gb", type=positive_float, default=4.0, help="size of each output file (GiB)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing out_dir (a checkpoint)"
    )
    return p


def run(args: argparse.Namespace) -> None:
    """Converts, printing one line per output file."""
    config = None if args.config is None else resolve_config(args.config)
    start = time.monotonic()

    def report(path: Path, count: int) -> None:
        size = os.path.getsize(path) / GIB
        print(f"{path.name}: {count} tensors, {size:.2f} GiB ({time.monotonic() - start:.0f} s)")

    out = convert_grok1_checkpoint(
        args.ckpt_dir,
        args.out_dir,
        config=config,
        dtype=args.dtype,
        max_file_bytes=max(1, int(args.max_file_gb * GIB)),
        overwrite=args.overwrite,
        on_file=report,
    )
    print(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``grok-convert``: 0 done, 1 refused, 2 bad command line."""
    return run_program(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
