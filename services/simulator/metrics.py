"""Prometheus metrics of the SGLang **simulator**, under SGLang's own metric names.

Each simulated server has its own :class:`~prometheus_client.CollectorRegistry`
(several simulators can run in one process), exported at ``/metrics``. Names and
the ``model_name`` label follow SGLang's ``metrics_collector.py``, so the
product's dashboards work unchanged against simulators and real servers.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["SimulatorMetrics"]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)


class SimulatorMetrics:
    """Counters, histograms and gauges for one simulated server."""

    def __init__(
        self,
        model_name: str,
        *,
        running: Callable[[], float],
        queued: Callable[[], float],
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        labels = ["model_name"]
        self._prompt_tokens = Counter(
            "sglang:prompt_tokens", "Prompt tokens processed.", labels, registry=self.registry
        )
        self._generation_tokens = Counter(
            "sglang:generation_tokens", "Generation tokens produced.", labels, registry=self.registry
        )
        self._cached_tokens = Counter(
            "sglang:cached_tokens", "Prompt tokens served from the prefix cache.", labels, registry=self.registry
        )
        self._requests = Counter("sglang:num_requests", "Requests finished.", labels, registry=self.registry)
        self._aborted = Counter("sglang:num_aborted_requests", "Requests aborted.", labels, registry=self.registry)
        self._so_requests = Counter(
            "sglang:num_so_requests", "Structured-output requests.", labels, registry=self.registry
        )
        self._e2e = Histogram(
            "sglang:e2e_request_latency_seconds", "End-to-end request latency.", labels,
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self._ttft = Histogram(
            "sglang:time_to_first_token_seconds", "Time to the first token.", labels,
            buckets=_TTFT_BUCKETS, registry=self.registry,
        )
        self._queue_time = Histogram(
            "sglang:queue_time_seconds", "Time spent waiting for a running slot.", labels,
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        gauge_specs = {
            "sglang:num_running_reqs": ("Requests running.", running),
            "sglang:num_queue_reqs": ("Requests waiting.", queued),
            "sglang:cache_hit_rate": ("Prefix-cache hit rate (cached / prompt tokens).", self._hit_rate),
        }
        for name, (doc, read) in gauge_specs.items():
            Gauge(name, doc, labels, registry=self.registry).labels(model_name).set_function(read)
        # Every series exists at 0 from the start: one born at its first request hides that
        # request's increase from rate() (no earlier sample), which a short load can lose entirely.
        # The labelled children are kept, so a request does not look them up again.
        self._prompt_tokens_series = self._prompt_tokens.labels(model_name)
        self._generation_tokens_series = self._generation_tokens.labels(model_name)
        self._cached_tokens_series = self._cached_tokens.labels(model_name)
        self._requests_series = self._requests.labels(model_name)
        self._aborted_series = self._aborted.labels(model_name)
        self._so_requests_series = self._so_requests.labels(model_name)
        self._e2e_series = self._e2e.labels(model_name)
        self._ttft_series = self._ttft.labels(model_name)
        self._queue_time_series = self._queue_time.labels(model_name)
        self._prompt_total = 0
        self._cached_total = 0

    def _hit_rate(self) -> float:
        return self._cached_total / self._prompt_total if self._prompt_total else 0.0

    def observe_finished(
        self,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
        e2e_latency: float,
        ttft: float | None,
        queue_time: float,
        structured: bool,
        aborted: bool,
    ) -> None:
        """Record one finished (or aborted) request."""
        self._prompt_tokens_series.inc(prompt_tokens)
        self._generation_tokens_series.inc(completion_tokens)
        self._cached_tokens_series.inc(cached_tokens)
        self._requests_series.inc()
        self._e2e_series.observe(e2e_latency)
        self._queue_time_series.observe(queue_time)
        if ttft is not None:
            self._ttft_series.observe(ttft)
        if structured:
            self._so_requests_series.inc()
        if aborted:
            self._aborted_series.inc()
        self._prompt_total += prompt_tokens
        self._cached_total += cached_tokens

    def observe_rejected(self) -> None:
        """Record a request the scheduler refused (queue full, grammar failure)."""
        self._aborted_series.inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of this server's registry."""
        return generate_latest(self.registry)
