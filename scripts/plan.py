"""Prints the per-device memory plan (weights by dtype, KV cache) for a config on a mesh.

    python scripts/plan.py                                  # Grok-2 on 8 x 80 GB, bf16
    python scripts/plan.py --model 8 --quantize fp8 --batch 8 --context 32768
    python scripts/plan.py --preset grok1 --data 2 --model 8 --device-gb 141

Nothing is allocated: the plan comes from the weight table and the sharding rules.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import jax.numpy as jnp  # noqa: E402

from grok.config import PRESETS, load_config  # noqa: E402
from grok.errors import GrokError  # noqa: E402
from grok.memory_plan import plan_memory  # noqa: E402

GB = 1e9  # device memory is sold in decimal gigabytes ("80 GB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="grok2", choices=sorted(PRESETS))
    parser.add_argument("--config", help="a checkpoint directory or config.json (over --preset)")
    parser.add_argument("--data", type=int, default=1, help="data-parallel mesh axis")
    parser.add_argument("--model", type=int, default=8, help="model-parallel mesh axis")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--quantize", choices=["fp8"], default=None)
    parser.add_argument("--batch", type=int, default=1, help="KV cache batch B")
    parser.add_argument("--context", type=int, default=None, help="KV cache slots S")
    parser.add_argument("--device-gb", type=float, default=80.0, help="memory of one device")
    args = parser.parse_args(argv)

    config = load_config(args.config) if args.config else PRESETS[args.preset]
    context = args.context if args.context is not None else config.max_position_embeddings
    try:
        plan = plan_memory(
            config,
            {"data": args.data, "model": args.model},
            dtype=jnp.dtype(args.dtype),
            quantize=args.quantize,
            batch=args.batch,
            context=context,
        )
    except GrokError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device_bytes = int(args.device_gb * GB)
    print(f"config: {args.config or args.preset}, dtype {args.dtype}, quantize {args.quantize}")
    print(plan.describe(device_bytes))
    return 0 if plan.total <= device_bytes else 1


if __name__ == "__main__":
    sys.exit(main())
