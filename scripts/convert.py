"""Converts Grok-1's released ``ckpt-0`` pickles to a safetensors checkpoint.

The output folder holds ``pytorch_model-000NN-TP-common.safetensors`` files with the tensor
names the Grok-2 release uses, and a ``config.json`` with the Grok-1 settings
(``tie_word_embeddings`` true, ``gelu_tanh``, no router/final cap, no temperature). Load it with
``grok.load_pretrained(out_dir, mesh=...)``: memory-mapped, sharded, no pickle. The pickles are
read with a restricted unpickler; the output is written into a hidden folder beside the target
and renamed into place only when complete.

    python scripts/convert.py /data/grok-1/ckpt-0 /data/grok-1-safetensors [--dtype bfloat16]
        [--config grok1 | --config path/to/config.json] [--max-file-gb 4] [--overwrite]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grok.config import PRESETS, get_preset, load_config  # noqa: E402
from grok.convert import OUTPUT_DTYPES, convert_grok1_checkpoint  # noqa: E402
from grok.errors import GrokError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt_dir", help="the Grok-1 ckpt-0 folder (or the folder holding it)")
    parser.add_argument("out_dir", help="the safetensors folder to create")
    parser.add_argument("--dtype", choices=sorted(OUTPUT_DTYPES), default="bfloat16")
    parser.add_argument(
        "--config",
        default=None,
        help=f"a preset ({', '.join(sorted(PRESETS))}) or a config.json path; "
        "default: a config.json beside the checkpoint, else grok1",
    )
    parser.add_argument("--max-file-gb", type=float, default=4.0, help="size of each output file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    args = parser.parse_args(argv)

    config = None
    if args.config is not None:
        config = get_preset(args.config) if args.config in PRESETS else load_config(args.config)
    start = time.monotonic()

    def report(path: Path, count: int) -> None:
        size = os.path.getsize(path) / 2**30
        print(f"{path.name}: {count} tensors, {size:.2f} GiB ({time.monotonic() - start:.0f} s)")

    try:
        out = convert_grok1_checkpoint(
            args.ckpt_dir,
            args.out_dir,
            config=config,
            dtype=args.dtype,
            max_file_bytes=max(1, int(args.max_file_gb * 2**30)),
            overwrite=args.overwrite,
            on_file=report,
        )
    except GrokError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
