"""grok against Hugging Face Mixtral and llama.cpp on one shape: see --help and
grok/bench/benchmark.py."""

from grok.bench.benchmark import main

if __name__ == "__main__":
    main()
