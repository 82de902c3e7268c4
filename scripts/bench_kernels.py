"""Weight-product benchmark, the native kernels against XLA's dot: see --help and
grok/bench/kernels.py."""

from grok.bench.kernels import main

if __name__ == "__main__":
    main()
