"""Prometheus metrics of the API (``GET /metrics``, the text exposition format).

Each app has its own ``CollectorRegistry`` (not prometheus-client's global one), so two
APIs in one process (tests, ``serve --api`` beside a client) never share counters.
Audit counters are read from the clients' auditors at scrape time rather than copied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

__all__ = ["ApiMetrics", "CONTENT_TYPE_LATEST"]

# Seconds: a loopback swarm answers in tens of ms, a WAN chain of a big model in tens of s.
_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _AuditCollector(Collector):
    def __init__(self, auditors: Callable[[], Iterable[tuple[str, Any]]]) -> None:
        self._auditors = auditors

    def collect(self) -> Iterator[CounterMetricFamily]:
        audits = CounterMetricFamily("swarm_api_audits", "Hop-steps spot-checked by recomputation",
                                     labels=["model"])
        outcomes = CounterMetricFamily("swarm_api_audit_outcomes", "Audit outcomes", labels=["model", "outcome"])
        for model, auditor in self._auditors():
            if auditor is None:
                continue
            audits.add_metric([model], auditor.stats.audits)
            for outcome, count in sorted(auditor.stats.outcomes.items()):
                outcomes.add_metric([model, outcome], count)
        yield audits
        yield outcomes


class ApiMetrics:
    """The API's counters; ``render()`` is the ``/metrics`` body."""

    def __init__(self, auditors: Callable[[], Iterable[tuple[str, Any]]] = lambda: ()) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("swarm_api_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.errors = Counter("swarm_api_errors", "Requests that ended in an error, by error type", ["type"],
                              registry=r)
        self.prompt_tokens = Counter("swarm_api_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("swarm_api_completion_tokens", "Tokens generated", ["model"], registry=r)
        self.failovers = Counter("swarm_api_failovers", "Hops replaced mid-generation", ["model"], registry=r)
        self.cancelled = Counter("swarm_api_cancelled", "Generations cancelled by a client that went away",
                                 ["model"], registry=r)
        self.active = Gauge("swarm_api_active_generations", "Generations running now", ["model"], registry=r)
        self.ttft = Histogram("swarm_api_time_to_first_token_seconds",
                              "From the request's arrival to its first generated token", ["model"],
                              buckets=_TTFT_BUCKETS, registry=r)
        r.register(_AuditCollector(auditors))

    def render(self) -> bytes:
        return generate_latest(self.registry)
