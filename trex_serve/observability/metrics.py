"""Prometheus metrics for the gateway, aggregated over every ingress replica.

Each ingress replica owns a :class:`GatewayMetrics` with its *own* ``CollectorRegistry`` (never the
global one): counters and histograms are fed one
:class:`~trex_serve.observability.request_record.RequestRecord` at a time by
:meth:`GatewayMetrics.observe` (a ``Runtime.observers`` callback), gauges are set by
:meth:`GatewayMetrics.refresh` from the routing table, the log writers and the key gate.

Serve runs several ingress replicas and ``/metrics`` on any one of them must cover all of them:
metrics_exchange.py merges every replica's exposition.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from trex_serve.observability.request_record import RequestRecord

log = logging.getLogger(__name__)

# 1 ms … 120 s, roughly ×2–2.5 per step.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
                   30.0, 60.0, 120.0)
CIRCUIT_STATES = ("closed", "open", "half_open")


class _WriterLike(Protocol):
    dropped: int

    @property
    def pending(self) -> int: ...


class _StreamLike(Protocol):
    backlog: int
    unacked: int


def _label(value: Any, default: str = "none") -> str:
    return default if value is None or value == "" else str(value)


class GatewayMetrics:
    """One replica's metrics, in a private registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.requests = Counter("trex_requests_total", "Requests by final status, requested model, provider "
                                "served and API.", ["status", "model", "provider", "api"], registry=r)
        self.latency = Histogram("trex_request_latency_seconds", "End-to-end request latency.",
                                 ["model", "provider"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttfb = Histogram("trex_ttfb_seconds", "Time to the first byte of the upstream answer.",
                              ["model", "provider"], buckets=LATENCY_BUCKETS, registry=r)
        self.attempts = Counter("trex_upstream_attempts_total", "Upstream attempts by provider.", ["provider"],
                                registry=r)
        self.upstream_errors = Counter("trex_upstream_errors_total", "Failed upstream attempts by provider and "
                                       "reason (http_<status>, timeout, connect, reset, ...).",
                                       ["provider", "reason"], registry=r)
        self.fallbacks = Counter("trex_fallbacks_total", "Attempts beyond the first, by requested model.",
                                 ["model"], registry=r)
        self.rejections = Counter("trex_rejections_total", "Requests refused before any upstream attempt, "
                                  "by error code.", ["reason"], registry=r)
        self.tokens = Counter("trex_tokens_total", "Tokens by direction (in|out) and billing mode.",
                              ["direction", "billing"], registry=r)
        # The classes partition the tokens above (reasoning is the part of output spent thinking):
        # what each was billed at is in docs/BILLING.md.
        self.token_classes = Counter("trex_tokens_by_class_total",
                                     "Tokens by billing class (input = uncached input, cache_read, cache_write, "
                                     "cache_write_1h, output, reasoning within output) and billing mode.",
                                     ["token_class", "billing"], registry=r)
        self.credits = Counter("trex_credits_consumed_micro_total", "Credits charged, in micro-credits.",
                               registry=r)
        self.quota_requests = Counter("trex_quota_requests_total", "Successful requests billed to quota.",
                                      registry=r)
        self.cache = Counter("trex_response_cache_total", "Requests that asked the response cache, by API and "
                             "result (hit: answered from the cache, nothing upstream; miss).", ["api", "result"],
                             registry=r)
        self.stored_failures = Counter("trex_stored_response_failures_total", "Responses that should have been "
                                       "stored (store: true) and could not be (the database refused).", registry=r)
        self.health_score = Gauge("trex_upstream_health_score", "Router health score per provider×model.",
                                  ["provider", "model"], registry=r)
        self.circuit = Gauge("trex_circuit_state", "Circuit breaker state per provider×model (1 = current).",
                             ["provider", "model", "state"], registry=r)
        self.log_dropped = Gauge("trex_log_rows_dropped_total", "Rows a batch writer dropped (buffer full).",
                                 ["writer"], registry=r)
        self.log_pending = Gauge("trex_log_rows_pending", "Rows waiting in a batch writer's buffer.",
                                 ["writer"], registry=r)
        self.stream_backlog = Gauge("trex_stream_backlog", "Entries of a durable Redis stream not yet in SQL.",
                                    ["stream"], registry=r)
        self.stream_unacked = Gauge("trex_stream_unacked",
                                    "Stream entries read by a replica and not yet committed and acknowledged.",
                                    ["stream"], registry=r)
        self.suspensions = Gauge("trex_key_suspensions_total", "Keys suspended by the key gate.", registry=r)
        self._targets: set[tuple[str, str]] = set()

    # ---- per request ------------------------------------------------------------------------------

    def observe(self, rec: RequestRecord) -> None:
        """Count one request. Safe to use as a ``Runtime.observers`` callback (never raises)."""
        try:
            self._observe(rec)
        except Exception:  # metrics must never break the request path
            log.exception("metrics: observe failed for request %s", getattr(rec, "request_id", "?"))

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: each ``labels()`` call takes a lock (~1.5 µs, eight
        per request), and these per-request metrics are never cleared."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _observe(self, rec: RequestRecord) -> None:
        child = self._child
        model = _label(rec.model_requested)
        provider = _label(rec.provider)
        child(self.requests, str(rec.status), model, provider, _label(rec.api)).inc()
        child(self.latency, model, provider).observe(max(0.0, rec.latency_ms) / 1000.0)
        if rec.ttfb_ms is not None:
            child(self.ttfb, model, provider).observe(max(0.0, rec.ttfb_ms) / 1000.0)
        if rec.attempt_detail:
            for attempt in rec.attempt_detail:
                child(self.attempts, _label(attempt.get("provider"))).inc()
                if attempt.get("error"):
                    child(self.upstream_errors, _label(attempt.get("provider")), str(attempt["error"])).inc()
        elif rec.attempts > 0:
            child(self.attempts, provider).inc(rec.attempts)
        if rec.fallbacks > 0:
            child(self.fallbacks, model).inc(rec.fallbacks)
        if rec.status >= 400 and rec.attempts == 0:
            child(self.rejections, _label(rec.error_code, default=f"http_{rec.status}")).inc()
        billing = _label(rec.billing)
        if rec.tokens_in > 0:
            child(self.tokens, "in", billing).inc(rec.tokens_in)
        if rec.tokens_out > 0:
            child(self.tokens, "out", billing).inc(rec.tokens_out)
        cache = rec.tokens_cache_read + rec.tokens_cache_write + rec.tokens_cache_write_1h
        for name, count in (("input", rec.tokens_in - cache), ("cache_read", rec.tokens_cache_read),
                            ("cache_write", rec.tokens_cache_write), ("cache_write_1h", rec.tokens_cache_write_1h),
                            ("output", rec.tokens_out), ("reasoning", rec.tokens_reasoning)):
            if count > 0:
                child(self.token_classes, name, billing).inc(count)
        if rec.credits_charged > 0:
            self.credits.inc(rec.credits_charged)
        if rec.billing == "quota" and rec.status == 200:
            self.quota_requests.inc()
        if rec.cache is not None:
            child(self.cache, _label(rec.api), rec.cache).inc()

    __call__ = observe

    # ---- periodic gauges --------------------------------------------------------------------------

    def refresh(self, table: Any, writers: Mapping[str, _WriterLike], suspensions: int,
                streams: Mapping[str, _StreamLike] | None = None) -> None:
        """Set the gauges. ``table`` is a ``RoutingTable`` (or ``None``), ``writers`` maps a name to a
        ``BatchWriter``-like object (``.dropped``, ``.pending``: this replica's memory), ``suspensions``
        is ``gate.suspensions``, ``streams`` maps a name to a ``StreamDrainer`` (``.backlog``,
        ``.unacked``: the shared Redis stream as last read)."""
        health = dict(getattr(table, "health", None) or {})
        for provider, model in self._targets - set(health):  # targets gone from the catalog
            with contextlib.suppress(KeyError):
                self.health_score.remove(provider, model)
            for state in CIRCUIT_STATES:
                with contextlib.suppress(KeyError):
                    self.circuit.remove(provider, model, state)
        self._targets = set()
        for (provider, model), th in health.items():
            self._targets.add((provider, model))
            self.health_score.labels(provider, model).set(th.score)
            for state in CIRCUIT_STATES:
                self.circuit.labels(provider, model, state).set(1.0 if th.state == state else 0.0)
        for name, writer in writers.items():
            self.log_dropped.labels(name).set(writer.dropped)
            self.log_pending.labels(name).set(writer.pending)
        for name, stream in (streams or {}).items():
            self.stream_backlog.labels(name).set(stream.backlog)
            self.stream_unacked.labels(name).set(stream.unacked)
        self.suspensions.set(suspensions)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
