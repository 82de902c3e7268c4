"""``grok-plan``: the per-device memory plan (weights by dtype, KV cache) before loading, and
with ``--topology`` the decode and prefill programs compiled for a TPU slice.

    grok-plan                                       # Grok-2 on 8 x 80 GB, bf16
    grok-plan --model 8 --quantize fp8 --batch 8 --context 32768
    grok-plan --config grok1 --data 2 --model 8 --device-gb 141
    grok-plan --config /path/to/grok-2              # a checkpoint directory or config.json
    grok-plan --topology v5p:2x2x2 --batch 8 --context 8192 --prefill 32768

Nothing is allocated: the plan comes from the weight table and the sharding rules; with
``--topology`` (libtpu installed: the ``tpu`` extra; no TPU needed) XLA's compiler reports each
program's bytes per chip (``grok.tpu_plan``). Exit status 0 when it fits the device, 1 when it
does not, 2 for a bad command line or config.
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
    UsageError,
    nonnegative_int,
    positive_float,
    positive_int,
    report,
    run_program,
)
from grok.config import GrokConfig
from grok.errors import MemoryPlanError
from grok.memory_plan import GIB, plan_memory
from grok.presets import PRESETS, resolve_config

PROG = "grok-plan"
GB = 1e9  # device memory is sold in decimal gigabytes ("80 GB")
DEFAULT_MODEL = 8  # the model axis without --topology
PREFILL_TOKENS = 8192  # the prefill program's prompt with --topology (at most the context)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``grok-plan``."""
    p = Parser(prog=PROG, description="Per-device memory plan of a Grok model on a mesh.")
    p.add_argument("--preset", default="grok2", choices=sorted(PRESETS))
    p.add_argument(
        "--config",
        help="a preset name, a checkpoint directory or a config.json (over --preset)",
    )
    p.add_argument("--data", type=positive_int, default=1, help="data-parallel mesh axis")
    p.add_argument(
        "--model",
        type=positive_int,
        default=None,
        help=f"model-parallel mesh axis (default {DEFAULT_MODEL}; with --topology the chips "
        "left over by --data)",
    )
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--quantize", choices=["fp8"], default=None)
    p.add_argument("--batch", type=nonnegative_int, default=1, help="KV cache batch B")
    p.add_argument(
        "--context", type=nonnegative_int, default=None, help="KV cache slots S (default: P)"
    )
    p.add_argument(
        "--device-gb",
        type=positive_float,
        default=None,
        help="memory of one device (GB; default 80, with --topology the chip's own)",
    )
    p.add_argument(
        "--topology",
        help="compile the decode and prefill programs for this TPU slice (libtpu's names: "
        "v5p:2x2x2, v5e:4x4, v6e:2x2, v4:2x2x1, ...)",
    )
    p.add_argument(
        "--prefill",
        type=positive_int,
        default=None,
        help=f"with --topology: the prefill program's prompt tokens T (default: the context, "
        f"at most {PREFILL_TOKENS})",
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Prints the plan; returns 0 when it fits the device, 1 when it does not."""
    name = args.config or args.preset
    config = resolve_config(name)
    context = args.context if args.context is not None else config.max_position_embeddings
    if args.topology is not None:
        return _run_topology(args, name, config, context)
    if args.prefill is not None:
        raise UsageError("--prefill needs --topology (the programs are compiled for a slice)")
    plan = plan_memory(
        config,
        {"data": args.data, "model": args.model or DEFAULT_MODEL},
        dtype=jnp.dtype(args.dtype),
        quantize=args.quantize,
        batch=args.batch,
        context=context,
    )
    device_bytes = int((args.device_gb or 80.0) * GB)
    print(f"config: {name}, dtype {args.dtype}, quantize {args.quantize}")
    print(plan.describe(device_bytes))
    return EXIT_OK if plan.total <= device_bytes else EXIT_ERROR


def _run_topology(args: argparse.Namespace, name: str, config: GrokConfig, context: int) -> int:
    """The programs compiled for ``args.topology``: their bytes beside the plan's; 1 (and one
    line on stderr naming the program and the shortfall) when one does not fit."""
    from grok import tpu_plan  # the compiler and JAX's programs: loaded for --topology only

    tpu_plan.compile_only_environment()
    if context < 1 or args.batch < 1:
        raise UsageError("--batch and --context must be >= 1 with --topology")
    prefill = args.prefill or min(context, PREFILL_TOKENS)
    if prefill > config.max_position_embeddings:
        raise UsageError(
            f"--prefill {prefill}: longer than the context of {config.max_position_embeddings}"
        )
    devices = tpu_plan.topology_devices(args.topology)
    setup = tpu_plan.slice_setup(
        config,
        devices,
        data=args.data,
        model=args.model,
        dtype=jnp.dtype(args.dtype),
        quantize=args.quantize,
    )
    device_bytes = (
        int(args.device_gb * GB) if args.device_gb else tpu_plan.chip_memory_bytes(devices)
    )
    memory = plan_memory(
        config,
        setup.load.memory.mesh,
        dtype=jnp.dtype(args.dtype),
        quantize=args.quantize,
        batch=args.batch,
        context=context,
    )
    print(
        f"config: {name}, dtype {args.dtype}, quantize {args.quantize}; {args.topology}: "
        f"{len(devices)} x {devices[0].device_kind}"
        + (f", {device_bytes / GIB:.2f} GiB each" if device_bytes else "")
    )
    print(memory.describe(device_bytes))
    try:
        reports = [
            tpu_plan.compile_prefill(
                setup,
                batch=1,
                tokens=prefill,
                slots=max(prefill, context),
                device_bytes=device_bytes,
            ),
            tpu_plan.compile_decode(
                setup, batch=args.batch, slots=context, device_bytes=device_bytes
            ),
        ]
    except MemoryPlanError as e:
        report(PROG, e)
        return EXIT_ERROR
    _print_programs(reports, memory)
    _print_roofline(tpu_plan, setup, reports[-1], args.batch, context, devices)
    if device_bytes:
        _print_largest(tpu_plan, setup, reports[-1], args.batch, context, device_bytes)
    return EXIT_OK


def _print_largest(tpu_plan, setup, decode, batch, context, device_bytes) -> None:
    """The largest batch at the context and context at the batch that fit, each estimated
    from the plan and the decode's temporaries and then compiled (``largest_compiled``)."""
    for what in ("batch", "context"):
        found = tpu_plan.largest_compiled(
            setup, decode, batch=batch, slots=context, device_bytes=device_bytes, vary=what
        )
        if found is None:
            print(f"largest {what}: not found (the compiler refused three estimates)")
            continue
        spare = (device_bytes - found.peak_bytes) / GIB
        print(
            f"largest {what}: {found.name.removeprefix('decode ').replace(' ', ' x ')} "
            f"(compiled: temporaries "
            f"{found.temp_bytes / GIB:.2f} GiB, {spare:.2f} GiB to spare)"
        )


def _print_programs(reports, memory) -> None:
    print(
        "per chip (XLA's memory analysis)     argument      output     aliased        temp"
        "   compile"
    )
    for r in reports:
        print(
            f"  {r.name:<32} {r.argument_bytes / GIB:8.2f} GiB {r.output_bytes / GIB:7.2f} GiB "
            f"{r.alias_bytes / GIB:7.2f} GiB {r.temp_bytes / GIB:7.2f} GiB {r.compile_s:7.1f} s"
        )
    decode = reports[-1]
    print(
        f"  decode arguments {decode.argument_bytes / GIB:.2f} GiB against the plan's "
        f"{memory.total / GIB:.2f} GiB ({(decode.argument_bytes / memory.total - 1) * 100:+.2f}%)"
    )
    for r in reports:
        if r.flops is not None:
            print(
                f"  {r.name}: XLA cost analysis (each loop body once) {r.flops:.3g} flops, "
                f"{r.bytes_accessed:.3g} bytes accessed"
            )


def _print_roofline(tpu_plan, setup, decode, batch, context, devices) -> None:
    weights, kv = tpu_plan.decode_step_bytes(setup, batch=batch, slots=context)
    line = (
        f"a decode step reads per chip at most {weights / GIB:.2f} GiB of weights and "
        f"{kv / GIB:.2f} GiB of cache"
    )
    bandwidth = tpu_plan.chip_bandwidth(devices)
    if bandwidth:
        step = (weights + kv) / bandwidth
        line += (
            f": >= {step * 1e3:.2f} ms at {bandwidth / 1e12:.2f} TB/s "
            f"(<= {batch / step:.0f} tokens/s for the batch)"
        )
    print(line)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``grok-plan``."""
    return run_program(build_parser(), run, argv, error_status=EXIT_BAD_ARGS)


if __name__ == "__main__":
    sys.exit(main())
