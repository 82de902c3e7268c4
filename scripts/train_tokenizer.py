"""Train the built-in tokenizer: `grok-train-tokenizer` (grok/cli/train_tokenizer.py)."""

from grok.cli.train_tokenizer import main

if __name__ == "__main__":
    raise SystemExit(main())
