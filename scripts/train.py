"""Train the built-in model: `grok-train` (see --help and grok/cli/train.py)."""

from grok.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
