"""``grok-serve``: an OpenAI-compatible HTTP server with continuous batching.

``engine`` runs the model (decode slots sharing one KV cache, one thread), ``sampler`` the
per-row sampling inside its compiled step, ``text`` incremental text and stop strings,
``protocol`` the OpenAI request/response shapes and errors, ``app`` the ASGI application,
``metrics`` the Prometheus metrics and ``cli`` the command line (``python -m grok.serve``).
"""
