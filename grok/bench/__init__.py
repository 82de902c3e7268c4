"""The benchmarks and the accelerator check, as a package; ``scripts/*.py`` are their command
lines (each a thin wrapper that imports a ``main``).

- ``shapes``: the shapes the benchmarks run, by name (``bench``, ``bench-grok1``,
  ``full-width-layer``).
- ``harness``: each engine in a fresh process pinned to the same CPUs; timing helpers.
- ``report``: medians and spread over the repeats, the sanity checks, the ratios, the tables.
- ``benchmark``: ``scripts/benchmark.py``, grok against its peers on one shape.
- ``grok_engine``, ``mixtral``, ``llama``: the engines' children (grok; Hugging Face
  ``MixtralForCausalLM``; llama.cpp through ``llama-cpp-python``), ``gguf_file`` the GGUF
  writer llama.cpp's weights come from, ``roofline`` the full-width layer against the memory
  bandwidth.
- ``generate``, ``kernels``: ``scripts/bench_generate.py``, ``scripts/bench_kernels.py``.
- ``device_check`` (with ``device_costs``): ``scripts/device_check.py``.

Random weights come from ``grok.testing.random_params``, as the tests' do. Nothing in the
library imports this package.
"""
