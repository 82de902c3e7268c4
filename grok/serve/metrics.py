"""The server's Prometheus metrics (``GET /metrics``), through ``prometheus_client``.

Each server owns its registry (not the library's global one), so several apps in one process
(tests) do not collide.
"""

from __future__ import annotations

import prometheus_client as prom

# Histogram buckets in seconds: time to first token spans a few ms (idle, small model) to
# minutes (a long queue); the time between tokens a ms to a second.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """Counters, gauges and histograms of one server, in ``registry``."""

    def __init__(self, max_batch: int):
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter(
            "grok_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = prom.Counter(
            "grok_prompt_tokens", "Prompt tokens of accepted requests", registry=r
        )
        self.generation_tokens = prom.Counter(
            "grok_generation_tokens", "Tokens generated (stop tokens included)", registry=r
        )
        self.sequences = prom.Counter(
            "grok_sequences_finished",
            "Sequences that left their slot, by reason (stop, length, cancelled)",
            ["reason"],
            registry=r,
        )
        self.queue_length = prom.Gauge(
            "grok_queue_length", "Sequences waiting for a decode slot", registry=r
        )
        self.batch_occupancy = prom.Gauge("grok_batch_occupancy", "Decode slots in use", registry=r)
        self.batch_slots = prom.Gauge("grok_batch_slots", "Decode slots in all", registry=r)
        self.batch_slots.set(max_batch)
        self.kv_cache_usage = prom.Gauge(
            "grok_kv_cache_usage",
            "Fraction of the KV cache's pages that running sequences hold (0 to 1)",
            registry=r,
        )
        self.kv_cache_pages = prom.Gauge(
            "grok_kv_cache_pages", "Pages in the KV cache's pool", registry=r
        )
        self.prefix_cached_pages = prom.Gauge(
            "grok_prefix_cache_pages", "KV pages published in the prefix cache", registry=r
        )
        self.prefix_hit_tokens = prom.Counter(
            "grok_prefix_cache_hit_tokens",
            "Prompt tokens whose keys and values came from the prefix cache",
            registry=r,
        )
        self.prefix_query_tokens = prom.Counter(
            "grok_prefix_cache_query_tokens",
            "Prompt tokens looked up in the prefix cache",
            registry=r,
        )
        self.preemptions = prom.Counter(
            "grok_preemptions",
            "Sequences preempted (their KV pages given back, recomputed later) for a full pool",
            registry=r,
        )
        self.ttft = prom.Histogram(
            "grok_time_to_first_token_seconds",
            "From a sequence's arrival to its first token (queueing and prefill included)",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.token_latency = prom.Histogram(
            "grok_time_per_output_token_seconds",
            "Time between a sequence's consecutive tokens",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def set_load(self, waiting: int, busy_slots: int) -> None:
        self.queue_length.set(waiting)
        self.batch_occupancy.set(busy_slots)

    def set_kv_pages(self, pages: int) -> None:
        self.kv_cache_pages.set(pages)

    def set_kv(self, usage: float, cached_pages: int) -> None:
        self.kv_cache_usage.set(usage)
        self.prefix_cached_pages.set(cached_pages)

    def prefix_lookup(self, hit_tokens: int, query_tokens: int) -> None:
        self.prefix_hit_tokens.inc(hit_tokens)
        self.prefix_query_tokens.inc(query_tokens)

    def preempted(self) -> None:
        self.preemptions.inc()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self.token_latency.observe(seconds)

    def sequence_done(self, reason: str, num_tokens: int) -> None:
        self.sequences.labels(reason=reason).inc()
        self.generation_tokens.inc(num_tokens)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST


__all__ = ["Metrics"]
