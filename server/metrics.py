"""Prometheus metrics: the only module that imports prometheus_client.

One registry per server, names prefixed `xyserve:` and labelled `model_name`, following vLLM's
names. Queue and KV-cache gauges are read from the engine's SchedulerStats when scraped (so they
cost nothing between scrapes); token and request counters are recorded as requests finish.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
)
from prometheus_client.exposition import generate_latest

from engine.stats import SchedulerStats

PREFIX = "xyserve:"

# No `*_created` series beside every counter (vLLM drops them too): they double the output and
# no dashboard reads them. (A process-wide switch; this is the only module using the library.)
disable_created_metrics()


class ServerMetrics:
    """The server's registry.

    Args:
        model_name: value of the `model_name` label (the served name).
        read_stats: returns the engine's latest SchedulerStats; called on every scrape.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, read_stats: Callable[[], SchedulerStats]) -> None:
        self.registry = CollectorRegistry()
        self._read_stats = read_stats
        labels = ("model_name",)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=self.registry)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, labels + extra, registry=self.registry)

        self._running = gauge("num_requests_running",
                              "Requests in the running batch (holding KV blocks).").labels(
                                  model_name)
        self._waiting = gauge("num_requests_waiting",
                              "Requests queued for admission (preempted ones included).").labels(
                                  model_name)
        self._kv_usage = gauge("kv_cache_usage_perc",
                               "Fraction of KV-cache blocks in use (1 = full).").labels(model_name)
        self._prompt_tokens = counter("prompt_tokens",
                                      "Prompt tokens of finished requests.").labels(model_name)
        self._generation_tokens = counter("generation_tokens",
                                          "Generated tokens of finished requests.").labels(
                                              model_name)
        self._success = counter("request_success", "Finished requests by finish reason.",
                                ("finished_reason",))
        self._model_name = model_name

    def record_finished(self, finish_reason: str, num_prompt_tokens: int,
                        num_output_tokens: int) -> None:
        """Count one finished engine request (each of n choices is one)."""
        self._prompt_tokens.inc(num_prompt_tokens)
        self._generation_tokens.inc(num_output_tokens)
        self._success.labels(self._model_name, finish_reason).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition, with the gauges refreshed from the engine now."""
        stats = self._read_stats()
        self._running.set(stats.num_running_reqs)
        self._waiting.set(stats.num_waiting_reqs)
        self._kv_usage.set(stats.kv_cache_usage)
        return generate_latest(self.registry)
