"""Generate text with a Grok model: `grok-sample` (see --help and grok/cli/sample.py)."""

from grok.cli.sample import main

if __name__ == "__main__":
    raise SystemExit(main())
