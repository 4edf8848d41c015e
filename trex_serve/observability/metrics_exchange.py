"""The ``/metrics`` exposition across every ingress replica.

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
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from trex_serve.observability.metrics import GatewayMetrics

log = logging.getLogger(__name__)

# Gauge families merged with max() instead of sum(): per-target views every replica shares.
MAX_MERGED = frozenset({"trex_upstream_health_score", "trex_circuit_state", "trex_stream_backlog",
                        "trex_stream_unacked"})
REPLICAS_METRIC = "trex_ingress_replicas"
COUNTER_STORE_UP = "trex_counter_store_up"
# Written by `trex-serve billing reconcile`, read back on every scrape (trex_serve/local/billing_reconcile.py).
RECONCILE_KEY = "reconcile:last"


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
