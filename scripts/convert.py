"""Grok-1 ckpt-0 pickles -> safetensors: `grok-convert` (see --help, grok/cli/convert.py)."""

from grok.cli.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
