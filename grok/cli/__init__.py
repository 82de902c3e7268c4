"""Command-line programs of the library (``grok-sample``)."""
