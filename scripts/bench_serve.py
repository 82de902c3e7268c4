"""grok-serve under load, its paged KV cache's targets and its robustness checks: see --help
and grok/bench/serve.py."""

from grok.bench.serve import main

if __name__ == "__main__":
    main()
