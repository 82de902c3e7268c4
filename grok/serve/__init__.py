"""``grok-serve``: an OpenAI-compatible HTTP server with continuous batching.

``engine`` runs the model (decode slots sharing one KV cache, one thread), ``sampler`` the
per-row sampling inside its compiled step, ``text`` incremental text, stop strings and the
tokenizer as served, ``protocol`` the OpenAI request/response shapes, errors and bounds,
``app`` the ASGI application, ``drain`` the graceful shutdown on SIGTERM, ``metrics`` the
Prometheus metrics and ``cli`` the command line (``python -m grok.serve``).
"""
