"""grok-serve under load: throughput levels, the paged KV cache's targets, robustness checks
(``scripts/bench_serve.py`` runs this).

    python -m grok.bench.serve                      # 1, 8, 32 clients (built-in model)
    python -m grok.bench.serve --url http://127.0.0.1:8000 --model grok-builtin
    python -m grok.bench.serve --targets prefix,long,many,throughput --runs 3
    python -m grok.bench.serve --check-bounds --check-drain --check-isolation

Levels: each client is a closed loop of streamed /v1/completions requests (the next starts
when the last ends); time to first token is measured at the first chunk with text. Before
measuring, one round at every concurrency compiles the server's shapes. Targets: 8 clients get
at least 4x the output tokens/s of one, and the p99 time to first token at 8 clients is within
3x of one client's (an idle server).

``--targets`` measures the paged KV cache's targets on a random-weight Grok-2-architecture
model (``BENCH`` of ``grok.bench.shapes``: D 512, 8 layers, 8/2 heads of 64, 8 experts; the
built-in tokenizer's 2048-token vocabulary; context 8192) served in float32, each engine
configuration in a fresh server process, every figure the median of ``--runs`` runs:

- prefix: 8 concurrent requests sharing a 2048-token prefix (after one warm request) against 8
  with unique prompts of the same length, alternated: >= 5x faster; the shared requests'
  greedy text equals ``Model.generate``'s. The same shared requests on a server with
  ``--no-prefix-cache`` for comparison.
- long: a 6000-token prompt arrives while 4 clients stream: no stream pauses longer than 15%
  of that prompt's prefill alone (its time to first token on the idle server), and its own
  time to first token stays within 1.5x of that.
- many: ``--max-batch 64 --max-context 8192 --kv-cache-tokens 16384``: 64 concurrent requests
  of 100 prompt tokens and 50 new tokens all complete.
- throughput: 8 closed-loop clients get >= 4x the output tokens/s of one (runs alternated).

``--check-bounds``, ``--check-drain`` and ``--check-isolation`` run the robustness checks
instead (each in fresh server processes of its own; see ``check_bounds`` and the others) and
exit 1 when a target is missed.

The server and the clients share the machine: on a busy machine the absolute figures are low
and noisy (``uptime`` is printed first), so compare within one run and rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from grok.bench.serve_checks import run_checks
from grok.bench.serve_clients import levels
from grok.bench.serve_targets import SERVE_FLAGS, TARGETS, targets


def main() -> None:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="a running server for the levels (default: start grok-serve)")
    p.add_argument("--model", default="grok-builtin", help="the served model name")
    p.add_argument("--max-batch", type=int, default=8, help="--max-batch of the started server")
    p.add_argument("--dtype", default="bfloat16", help="--dtype of the started server")
    p.add_argument("--clients", default="1,8,32", help="concurrency levels")
    p.add_argument("--requests", type=int, default=64, help="requests per level (at least 2 each)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    p.add_argument("--targets", help=f"measure these targets instead: {','.join(TARGETS)}")
    p.add_argument("--runs", type=int, default=3, help="runs per target (medians reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the targets' random prompts")
    p.add_argument(
        "--serve-flags", default="", help="more grok-serve flags for the targets' servers"
    )
    p.add_argument(
        "--model-dir",
        default=str(Path(tempfile.gettempdir()) / "grok-bench-serve-model"),
        help="where the targets' random-weight checkpoint is written (once) and read",
    )
    # Robustness checks: each flag runs its check (instead of the levels).
    p.add_argument("--check-bounds", action="store_true", help="413/400 bounds and memory")
    p.add_argument("--check-drain", action="store_true", help="SIGTERM: drain and exit 0")
    p.add_argument("--check-isolation", action="store_true", help="one sequence's failure")
    p.add_argument("--drain-timeout", type=float, default=5.0, help="for --check-drain")
    args = p.parse_args()
    if args.check_bounds or args.check_drain or args.check_isolation:
        sys.exit(run_checks(args))
    if args.targets:
        unknown = set(args.targets.split(",")) - set(TARGETS)
        if unknown:
            p.error(f"--targets: unknown {sorted(unknown)}; known: {','.join(TARGETS)}")
        SERVE_FLAGS.extend(args.serve_flags.split())
        targets(args)
    else:
        levels(args)


if __name__ == "__main__":
    main()
