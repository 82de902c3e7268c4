"""Weight-product benchmark: the native kernels (``grok.kernels.cpu``) against XLA's dot.

    python scripts/bench_kernels.py                 # W [16384, 8192], rows 1, 2 and 8
    python scripts/bench_kernels.py --out 4096 --in 4096 --rows 1 8 64

For each dtype (float32, bfloat16) and row count it reports the weight bytes read per second
of ``x [R, I] . W[l] [O, I]^T`` for W one matrix of a stacked [2, O, I] weight: XLA's einsum
(float32 accumulation, as ``Kernels.project`` asks, on the matrix already sliced out) and
``grok.kernels.cpu.matvec`` reading it in place. Medians of ``--repeats`` timed calls after one
that compiles. Both engines are JAX calls, so one process runs both; it prints nothing for the
kernel where ``grok.kernels.cpu.available`` is False, and says why.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from grok.kernels import cpu


def _median_s(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=int, default=16384, help="O, the weight's output rows")
    parser.add_argument("--in", dest="inp", type=int, default=8192, help="I, its input width")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    print(f"W [{args.out}, {args.inp}] inside a [2, O, I] stack; GB/s of weight bytes read")
    for dtype in (jnp.float32, jnp.bfloat16):
        w = jnp.asarray(rng.standard_normal((2, args.out, args.inp), np.float32) * 0.01, dtype)
        matrix = w[1]  # XLA reads a matrix that is already its own array
        nbytes = matrix.nbytes
        xla = jax.jit(
            lambda x, m: jnp.einsum("RI,OI->RO", x, m, preferred_element_type=jnp.float32)
        )
        kernel = jax.jit(lambda x, w: cpu.matvec(x, w, (1,)))
        for rows in args.rows:
            x = jnp.asarray(rng.standard_normal((rows, args.inp), np.float32), dtype)
            line = f"{jnp.dtype(dtype).name:>8} rows {rows:>3}: XLA "
            line += f"{nbytes / _median_s(xla, x, matrix, repeats=args.repeats) / 1e9:6.3g}"
            if cpu.available(dtype):
                t = _median_s(kernel, x, w, repeats=args.repeats)
                line += f", native {nbytes / t / 1e9:6.3g}"
            else:
                line += f", native unavailable ({cpu.why_unavailable() or 'no kernel'})"
            print(line)


if __name__ == "__main__":
    main()
