"""Per-device memory plan before loading: `grok-plan` (see --help and grok/cli/plan.py)."""

from grok.cli.plan import main

if __name__ == "__main__":
    raise SystemExit(main())
