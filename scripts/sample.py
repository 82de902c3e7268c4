"""Generate text with a Grok model (the same program as `grok-sample`; see --help)."""

import sys
from pathlib import Path

# Run from a checkout without installing: make the repository's ``grok`` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grok.cli.sample import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
