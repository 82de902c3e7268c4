"""``grok-plan``: the per-device memory plan (weights by dtype, KV cache) before loading.

    grok-plan                                       # Grok-2 on 8 x 80 GB, bf16
    grok-plan --model 8 --quantize fp8 --batch 8 --context 32768
    grok-plan --config grok1 --data 2 --model 8 --device-gb 141
    grok-plan --config /path/to/grok-2              # a checkpoint directory or config.json

Nothing is allocated: the plan comes from the weight table and the sharding rules. Exit status
0 when the plan fits the device, 1 when it does not, 2 for a bad command line or config.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax.numpy as jnp

from grok.cli.common import (
    EXIT_BAD_ARGS,
    EXIT_ERROR,
    EXIT_OK,
    Parser,
    nonnegative_int,
    positive_float,
    positive_int,
    run_program,
)
from grok.memory_plan import plan_memory
from grok.presets import PRESETS, resolve_config

PROG = "grok-plan"
GB = 1e9  # device memory is sold in decimal gigabytes ("80 GB")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``grok-plan``."""
    p = Parser(prog=PROG, description="Per-device memory plan of a Grok model on a mesh.")
    p.add_argument("--preset", default="grok2", choices=sorted(PRESETS))
    p.add_argument(
        "--config",
        help="a preset name, a checkpoint directory or a config.json (over --preset)",
    )
    p.add_argument("--data", type=positive_int, default=1, help="data-parallel mesh axis")
    p.add_argument("--model", type=positive_int, default=8, help="model-parallel mesh axis")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--quantize", choices=["fp8"], default=None)
    p.add_argument("--batch", type=nonnegative_int, default=1, help="KV cache batch B")
    p.add_argument(
        "--context", type=nonnegative_int, default=None, help="KV cache slots S (default: P)"
    )
    p.add_argument(
        "--device-gb", type=positive_float, default=80.0, help="memory of one device (GB)"
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Prints the plan; returns 0 when it fits ``--device-gb``, 1 when it does not."""
    name = args.config or args.preset
    config = resolve_config(name)
    context = args.context if args.context is not None else config.max_position_embeddings
    plan = plan_memory(
        config,
        {"data": args.data, "model": args.model},
        dtype=jnp.dtype(args.dtype),
        quantize=args.quantize,
        batch=args.batch,
        context=context,
    )
    device_bytes = int(args.device_gb * GB)
    print(f"config: {name}, dtype {args.dtype}, quantize {args.quantize}")
    print(plan.describe(device_bytes))
    return EXIT_OK if plan.total <= device_bytes else EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``grok-plan``."""
    return run_program(build_parser(), run, argv, error_status=EXIT_BAD_ARGS)


if __name__ == "__main__":
    sys.exit(main())
