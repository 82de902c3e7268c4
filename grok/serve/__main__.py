"""``python -m grok.serve``: the same program as ``grok-serve`` (see ``grok.serve.cli``)."""

import sys

from grok.serve.cli import main

sys.exit(main())
