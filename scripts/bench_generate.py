"""Generation benchmark (time to first token, decode tokens/s at batch 1 and 8): see --help
and grok/bench/generate.py."""

from grok.bench.generate import main

if __name__ == "__main__":
    main()
