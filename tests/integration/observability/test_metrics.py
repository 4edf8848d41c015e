"""Metrics across replicas: two GatewayMetrics+MetricsExchange pairs sharing a real Redis."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from trex_serve.observability.metrics import GatewayMetrics
from trex_serve.observability.metrics_exchange import CONTENT_TYPE_LATEST, MetricsExchange, metrics_response
from trex_serve.observability.request_record import RequestRecord
from trex_serve.routing.health import TargetHealth
from trex_serve.routing.resolve import RoutingTable


def rec(status: int = 200, *, model: str = "gpt-4o", provider: str | None = "openai", api: str = "chat",
        attempts: int = 1, fallbacks: int = 0, error_code: str | None = None, latency_ms: float = 120.0,
        ttfb_ms: float | None = 40.0, tokens_in: int = 10, tokens_out: int = 5, billing: str | None = "quota",
        credits: int = 0, detail: list | None = None) -> RequestRecord:
    return RequestRecord(
        request_id="r", api=api, account_id="a", key_id="k", key_prefix="tx-", model_requested=model,
        provider=provider, model_served=model if provider else None, attempts=attempts, fallbacks=fallbacks,
        status=status, error_code=error_code, latency_ms=latency_ms, ttfb_ms=ttfb_ms, tokens_in=tokens_in,
        tokens_out=tokens_out, billing=billing, credits_charged=credits, stream=False, client_ip="1.2.3.4",
        attempt_detail=detail or [])


def samples(text: bytes) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: bytes, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


@dataclass
class FakeWriter:
    dropped: int
    pending: int


@pytest.fixture
async def client(redis_url):
    c = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield c
    await c.aclose()


@pytest.fixture
async def replicas(client, key_prefix):
    made: list[MetricsExchange] = []

    def make(rid: str, interval_s: float = 0.2) -> MetricsExchange:
        ex = MetricsExchange(client, key_prefix, rid, GatewayMetrics(), interval_s=interval_s)
        made.append(ex)
        return ex

    yield make
    for ex in made:
        await ex.stop()


async def test_render_sums_across_replicas(replicas):
    a, b = replicas("a"), replicas("b")
    for _ in range(3):
        a.metrics.observe(rec(latency_ms=5.0))
    for _ in range(2):
        b.metrics.observe(rec(latency_ms=3000.0, credits=250, billing="credits"))
    b.metrics.observe(rec(401, provider=None, attempts=0, error_code="invalid_api_key", ttfb_ms=None,
                          tokens_in=0, tokens_out=0, billing=None))
    a.metrics.observe(rec(200, attempts=2, fallbacks=1, detail=[
        {"provider": "azure", "status": 503}, {"provider": "openai", "status": 200}]))
    await a.publish()
    await b.publish()

    for ex in (a, b):
        text = await ex.render()
        ok = dict(status="200", model="gpt-4o", provider="openai", api="chat")
        assert value(text, "trex_requests_total", **ok) == 6  # 4 on a + 2 on b
        assert value(text, "trex_requests_total", status="401", model="gpt-4o", provider="none", api="chat") == 1
        lat = dict(model="gpt-4o", provider="openai")
        assert value(text, "trex_request_latency_seconds_count", **lat) == 6
        assert value(text, "trex_request_latency_seconds_bucket", le="0.005", **lat) == 3
        assert value(text, "trex_request_latency_seconds_bucket", le="+Inf", **lat) == 6
        assert value(text, "trex_request_latency_seconds_sum", **lat) == pytest.approx(0.015 + 6.0 + 0.12)
        assert value(text, "trex_ttfb_seconds_count", **lat) == 6
        assert value(text, "trex_upstream_attempts_total", provider="openai") == 6
        assert value(text, "trex_upstream_attempts_total", provider="azure") == 1
        assert value(text, "trex_fallbacks_total", model="gpt-4o") == 1
        assert value(text, "trex_rejections_total", reason="invalid_api_key") == 1
        assert value(text, "trex_tokens_total", direction="in", billing="quota") == 40
        assert value(text, "trex_tokens_total", direction="out", billing="credits") == 10
        assert value(text, "trex_credits_consumed_micro_total") == 500
        assert value(text, "trex_quota_requests_total") == 4
        assert value(text, "trex_ingress_replicas") == 2
        body = text.decode()
        assert body.count("# TYPE trex_requests_total counter") == 1
        assert body.count("# HELP trex_request_latency_seconds ") == 1
        assert "_created" not in body


async def test_local_numbers_fresh_without_publish(replicas):
    a, b = replicas("a"), replicas("b")
    b.metrics.observe(rec())
    await b.publish()
    a.metrics.observe(rec())
    a.metrics.observe(rec())  # never published: render still counts this replica's own numbers
    body, ctype = await metrics_response(a)
    assert ctype == CONTENT_TYPE_LATEST
    assert value(body, "trex_requests_total", status="200", model="gpt-4o", provider="openai", api="chat") == 3


async def test_background_publish_and_expiry(replicas, client):
    a, b = replicas("a", 0.1), replicas("b", 0.1)
    a.metrics.observe(rec())
    b.metrics.observe(rec())
    a.start()
    b.start()
    await asyncio.sleep(0.25)
    assert set(await a.live_snapshots()) == {"a", "b"}
    assert value(await a.render(), "trex_ingress_replicas") == 2

    await b.stop(remove=False)  # as if the replica died: its snapshot outlives it by its TTL only
    assert await client.pttl(b.key()) <= 300
    await asyncio.sleep(0.45)
    assert set(await a.live_snapshots()) == {"a"}
    text = await a.render()
    assert value(text, "trex_ingress_replicas") == 1
    assert value(text, "trex_requests_total", status="200", model="gpt-4o", provider="openai", api="chat") == 1

    await a.stop()  # clean shutdown removes the snapshot at once
    assert await client.exists(a.key()) == 0


async def test_refresh_gauges(replicas):
    a, b = replicas("a"), replicas("b")
    table = RoutingTable({("openai", "gpt-4o"): TargetHealth("closed", 0.9),
                          ("azure", "gpt-4o"): TargetHealth("open", 0.1)})
    # Replicas may hold slightly different copies of the table: health and circuit take the max.
    table_b = RoutingTable({("openai", "gpt-4o"): TargetHealth("closed", 0.8),
                            ("azure", "gpt-4o"): TargetHealth("open", 0.1)})
    a.metrics.refresh(table, {"logs": FakeWriter(3, 10), "ledger": FakeWriter(0, 1)}, suspensions=2,
                      streams={"ledger": SimpleNamespace(backlog=7, unacked=2)})
    b.metrics.refresh(table_b, {"logs": FakeWriter(1, 5), "ledger": FakeWriter(0, 0)}, suspensions=1,
                      streams={"ledger": SimpleNamespace(backlog=5, unacked=3)})
    await b.publish()
    text = await a.render()
    assert value(text, "trex_upstream_health_score", provider="openai", model="gpt-4o") == pytest.approx(0.9)
    assert value(text, "trex_circuit_state", provider="azure", model="gpt-4o", state="open") == 1
    assert value(text, "trex_circuit_state", provider="azure", model="gpt-4o", state="closed") == 0
    assert value(text, "trex_circuit_state", provider="openai", model="gpt-4o", state="closed") == 1
    assert value(text, "trex_log_rows_dropped_total", writer="logs") == 4
    assert value(text, "trex_log_rows_pending", writer="logs") == 15
    assert value(text, "trex_log_rows_pending", writer="ledger") == 1
    assert value(text, "trex_key_suspensions_total") == 3
    # Every replica reads the same shared stream: its backlog is not summed over replicas.
    assert value(text, "trex_stream_backlog", stream="ledger") == 7
    assert value(text, "trex_stream_unacked", stream="ledger") == 3

    # A target gone from the table disappears from the gauges.
    a.metrics.refresh(RoutingTable({("openai", "gpt-4o"): TargetHealth("half_open", 0.5)}), {}, 0)
    local = a.metrics.exposition()
    assert value(local, "trex_upstream_health_score", provider="azure", model="gpt-4o") is None
    assert value(local, "trex_circuit_state", provider="openai", model="gpt-4o", state="half_open") == 1


async def test_observe_never_raises():
    m = GatewayMetrics()
    m.observe(object())  # type: ignore[arg-type]
    m(rec())
    assert value(m.exposition(), "trex_requests_total", status="200", model="gpt-4o", provider="openai",
                 api="chat") == 1
