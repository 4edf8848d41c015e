"""Prometheus metrics for the gateway, aggregated over every ingress replica.

Each ingress replica owns a :class:`GatewayMetrics` with its *own* ``CollectorRegistry`` (never the
global one): counters and histograms are fed one
:class:`~trex_serve.observability.request_record.RequestRecord` at a time by
:meth:`GatewayMetrics.observe` (a ``Runtime.observers`` callback), gauges are set by
:meth:`GatewayMetrics.refresh` from the routing table, the log writers and the key gate.

Serve runs several ingress replicas and ``/metrics`` on any one of them must cover all of them, so a
:class:`MetricsExchange` publishes this replica's exposition text into Redis every ``interval_s``
(``{prefix}metrics:{replica_id}``, expiring after ~3 intervals so a dead replica's numbers vanish) and
indexes it in a sorted set (``{prefix}metrics-replicas``, score = last publish time; no SCAN over the
counter keyspace). :meth:`MetricsExchange.render` reads every live snapshot, substitutes a fresh one
for the local replica, and merges them:

* counters, histogram buckets/``_sum``/``_count`` and most gauges (writer backlog, dropped rows,
  key suspensions: each replica has its own writers and gate) are **summed** per (sample, labels);
* ``trex_upstream_health_score`` and ``trex_circuit_state`` take the **max**: every replica holds a
  copy of the same Router table, so summing would multiply it by the replica count. (During a table
  publish two replicas may briefly disagree, so a target may for one scrape show 1 for two states.)
  So do ``trex_stream_backlog`` and ``trex_stream_unacked``: every replica reads the same Redis
  streams (the newest reading wins over an older one only by being larger; both are seconds old).
* ``*_created`` series are dropped (a sum of creation timestamps means nothing);
* ``trex_ingress_replicas`` is added: the number of replicas whose snapshot went into the merge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from trex_serve.observability.request_record import RequestRecord

log = logging.getLogger(__name__)

# 1 ms … 120 s, roughly ×2–2.5 per step.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
                   30.0, 60.0, 120.0)
CIRCUIT_STATES = ("closed", "open", "half_open")
# Gauge families merged with max() instead of sum(): per-target views every replica shares.
MAX_MERGED = frozenset({"trex_upstream_health_score", "trex_circuit_state", "trex_stream_backlog",
                        "trex_stream_unacked"})
REPLICAS_METRIC = "trex_ingress_replicas"
COUNTER_STORE_UP = "trex_counter_store_up"
# Written by `trex-serve billing reconcile`, read back on every scrape (trex_serve/local/billing_reconcile.py).
RECONCILE_KEY = "reconcile:last"


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


# ---- merging ---------------------------------------------------------------------------------------


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _header_name(name: str, typ: str) -> str:
    # The parser strips ``_total`` from a counter family's name; the text format keeps it.
    return f"{name}_total" if typ == "counter" else name


def merge_expositions(texts: list[str], extra: dict[str, tuple[str, str, float]] | None = None) -> bytes:
    """Merge Prometheus text expositions: same family and same labels → one sample (summed, or max for
    :data:`MAX_MERGED`). ``extra`` adds unlabelled gauges: ``{name: (type, help, value)}``."""
    families: dict[str, dict[str, Any]] = {}
    for text in texts:
        try:
            parsed = list(text_string_to_metric_families(text))
        except Exception:
            log.warning("metrics: skipping an unparsable replica snapshot", exc_info=True)
            continue
        for fam in parsed:
            if fam.name.endswith("_created") or fam.name == REPLICAS_METRIC:
                continue
            entry = families.get(fam.name)
            if entry is None:
                entry = families[fam.name] = {"type": fam.type, "help": fam.documentation, "samples": {}}
            use_max = fam.name in MAX_MERGED
            samples: dict[tuple, float] = entry["samples"]
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                key = (s.name, tuple(s.labels.items()))
                if key not in samples:
                    samples[key] = s.value
                elif use_max:
                    samples[key] = max(samples[key], s.value)
                else:
                    samples[key] = samples[key] + s.value
    lines: list[str] = []
    for name, entry in families.items():
        header = _header_name(name, entry["type"])
        lines.append(f"# HELP {header} {_escape_help(entry['help'])}")
        lines.append(f"# TYPE {header} {entry['type']}")
        for (sample_name, labels), value in entry["samples"].items():
            lines.append(_sample_line(sample_name, labels, value))
    for name, (typ, help_text, value) in (extra or {}).items():
        lines.append(f"# HELP {name} {_escape_help(help_text)}")
        lines.append(f"# TYPE {name} {typ}")
        lines.append(_sample_line(name, (), value))
    return ("\n".join(lines) + "\n").encode()


def _sample_line(name: str, labels: tuple[tuple[str, str], ...], value: float) -> str:
    if labels:
        inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
        name = f"{name}{{{inner}}}"
    return f"{name} {floatToGoString(value) if not math.isnan(value) else 'NaN'}"


# ---- exchange through Redis -------------------------------------------------------------------------


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class MetricsExchange:
    """Publishes this replica's snapshot into Redis and renders the merge of all live replicas.

    ``redis_client`` is a ``redis.asyncio.Redis`` (decoded or not; e.g. ``CounterStore.client``),
    ``prefix`` the key namespace (``CounterStore.prefix``)."""

    def __init__(self, redis_client: Any, prefix: str, replica_id: str | None, metrics: GatewayMetrics,
                 interval_s: float = 2.0) -> None:
        self.client = redis_client
        self.prefix = prefix
        self.replica_id = replica_id or default_replica_id()
        self.metrics = metrics
        self.interval_s = interval_s
        self.ttl_ms = max(1, int(interval_s * 3 * 1000))
        self.index_key = f"{prefix}metrics-replicas"
        self._task: asyncio.Task | None = None
        self._stopping = False

    def key(self, replica_id: str | None = None) -> str:
        return f"{self.prefix}metrics:{replica_id or self.replica_id}"

    async def publish(self) -> None:
        """Write this replica's snapshot now (the background task calls this every interval)."""
        text = self.metrics.exposition()
        now = time.time()
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.key(), text, px=self.ttl_ms)
        pipe.zadd(self.index_key, {self.replica_id: now})
        # Index entries far older than the snapshot TTL belong to replicas that died.
        pipe.zremrangebyscore(self.index_key, "-inf", now - 10 * self.ttl_ms / 1000)
        await pipe.execute()

    async def _run(self) -> None:
        # The flag, not only the cancellation, ends the loop: redis-py can swallow a CancelledError
        # that lands in the middle of a command.
        while not self._stopping:
            try:
                await self.publish()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("metrics: publishing the snapshot to Redis failed", exc_info=True)
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._stopping = False
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="metrics-exchange")

    async def stop(self, *, remove: bool = True) -> None:
        """Stop publishing; ``remove`` deletes this replica's snapshot at once (a clean shutdown),
        otherwise it expires after its TTL (as it would if the replica died)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            # Bounded: a publish cancelled mid-command can leave redis-py waiting on its socket.
            await asyncio.wait({self._task}, timeout=2.0)
            self._task = None
        if remove:
            with contextlib.suppress(Exception):
                pipe = self.client.pipeline(transaction=False)
                pipe.delete(self.key())
                pipe.zrem(self.index_key, self.replica_id)
                await asyncio.wait_for(pipe.execute(), timeout=2.0)

    async def live_snapshots(self) -> dict[str, str]:
        """Snapshot text of every replica whose key has not expired, by replica id."""
        ids = [i.decode() if isinstance(i, bytes) else i for i in await self.client.zrange(self.index_key, 0, -1)]
        if not ids:
            return {}
        values = await self.client.mget([self.key(i) for i in ids])
        out: dict[str, str] = {}
        for rid, value in zip(ids, values, strict=True):
            if value is not None:
                out[rid] = value.decode() if isinstance(value, bytes) else value
        return out

    async def render(self) -> bytes:
        """The exposition covering every live replica (this one always with fresh numbers). If Redis
        cannot be reached, this replica's numbers alone, and ``trex_counter_store_up 0``."""
        reconcile: dict[str, float] = {}
        try:
            snapshots = await self.live_snapshots()
            reconcile = await self.last_reconcile()
            store_up = 1.0
        except Exception:
            log.warning("metrics: reading replica snapshots from Redis failed", exc_info=True)
            snapshots, store_up = {}, 0.0
        snapshots[self.replica_id] = self.metrics.exposition().decode()
        extra = {REPLICAS_METRIC: ("gauge", "Ingress replicas whose metrics are in this exposition.",
                                   float(len(snapshots))),
                 COUNTER_STORE_UP: ("gauge", "1 when this scrape could read the counter store (Redis), else 0.",
                                    store_up),
                 "trex_reconcile_mismatched_accounts": (
                     "gauge", "Accounts whose Redis balance and SQL ledger disagreed (unfixed) at the last "
                     "`trex-serve billing reconcile`.", reconcile.get("mismatched", 0.0)),
                 "trex_reconcile_last_run_timestamp_seconds": (
                     "gauge", "Unix time of the last `trex-serve billing reconcile` (0: never run).",
                     reconcile.get("at", 0.0))}
        return merge_expositions(list(snapshots.values()), extra)

    async def last_reconcile(self) -> dict[str, float]:
        raw = await self.client.hgetall(f"{self.prefix}{RECONCILE_KEY}")
        out: dict[str, float] = {}
        for k, v in (raw or {}).items():
            key = k.decode() if isinstance(k, bytes) else k
            with contextlib.suppress(ValueError):
                out[key] = float(v.decode() if isinstance(v, bytes) else v)
        return out


async def metrics_response(exchange: MetricsExchange) -> tuple[bytes, str]:
    """``(body, content_type)`` for a ``/metrics`` route."""
    return await exchange.render(), CONTENT_TYPE_LATEST
