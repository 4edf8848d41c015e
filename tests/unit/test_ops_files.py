"""The Grafana dashboard and the Prometheus alert rules against the gateway's metrics code: every
series they query is one the gateway exports, the rules pass `promtool check rules`, and promtool
evaluates them on expositions rendered by GatewayMetrics (the live-gateway check is in
tests/e2e/test_operations_kit.py)."""

from __future__ import annotations

import json
import subprocess
import uuid
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tests import ops_files
from trex_serve.local.embedded import free_port
from trex_serve.observability.metrics import GatewayMetrics
from trex_serve.observability.metrics_exchange import MetricsExchange
from trex_serve.observability.request_record import RequestRecord
from trex_serve.routing.health import TargetHealth
from trex_serve.routing.resolve import RoutingTable

needs_promtool = pytest.mark.skipif(ops_files.promtool() is None,
                                    reason="promtool not installed (Debian package 'prometheus')")


@dataclass
class Writer:
    dropped: int = 0
    pending: int = 0


@dataclass
class Stream:
    backlog: int = 0
    unacked: int = 0


STREAMS = {"ledger": Stream(), "logs": Stream(), "risk_events": Stream()}


def rec(status=200, provider="alpha", attempts=1, error=None, detail=None, billing="quota") -> RequestRecord:
    return RequestRecord(
        request_id="r", api="chat", account_id="a", key_id="k", key_prefix="tx", model_requested="gpt-4o-mini",
        provider=provider, model_served="m" if provider else None, attempts=attempts,
        fallbacks=max(0, attempts - 1), status=status, error_code=error, latency_ms=80.0,
        ttfb_ms=30.0 if status == 200 else None, tokens_in=10, tokens_out=5 if status == 200 else 0,
        billing=billing, credits_charged=40 if billing == "credits" else 0, stream=False, client_ip="127.0.0.1",
        attempt_detail=detail if detail is not None else [{"provider": provider, "status": status, "error": None}])


async def exposition(metrics: GatewayMetrics, redis_url: str | None) -> str:
    """What /metrics renders for this replica alone: with a real Redis, or (``redis_url`` None)
    with a Redis address nothing listens on."""
    if redis_url:
        client = aioredis.Redis.from_url(redis_url)
    else:
        client = aioredis.Redis(host="127.0.0.1", port=free_port(), retry=Retry(NoBackoff(), 0))
    try:
        return (await MetricsExchange(client, f"t{uuid.uuid4().hex[:8]}:", "r1", metrics).render()).decode()
    finally:
        await client.aclose()


def busy(metrics: GatewayMetrics, fail_alpha: int = 0) -> None:
    for _ in range(10):
        metrics.observe(rec())
        metrics.observe(rec(billing="credits"))
    for _ in range(fail_alpha):
        metrics.observe(rec(provider="beta", attempts=2, detail=[
            {"provider": "alpha", "status": 503, "error": "http_503"}, {"provider": "beta", "status": 200}]))
    metrics.observe(rec(401, provider=None, attempts=0, error="invalid_api_key", detail=[], billing=None))
    metrics.observe(rec(429, provider=None, attempts=0, error="rate_limit_exceeded", detail=[]))


def table(alpha_state="closed") -> RoutingTable:
    return RoutingTable({("alpha", "alpha-mini"): TargetHealth(alpha_state, 0.1 if alpha_state == "open" else 0.9),
                         ("beta", "beta-mini"): TargetHealth("closed", 0.95)})


async def test_every_queried_series_is_exported(redis_url):
    m = GatewayMetrics()
    busy(m, fail_alpha=2)
    m.refresh(table(), {"logs": Writer(), "ledger": Writer()}, 0, STREAMS)
    names = ops_files.exported_names(await exposition(m, redis_url))
    for title, expr in ops_files.dashboard_queries():
        assert ops_files.metric_names(expr), title
        assert ops_files.metric_names(expr) <= names, (title, ops_files.metric_names(expr) - names)
    for rule in ops_files.alert_rules():
        assert ops_files.metric_names(rule["expr"]) <= names, rule["alert"]


def test_dashboard_is_well_formed():
    dash = json.loads(ops_files.DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "job"}
    for panel in dash["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'job=~"$job"' in target["expr"], panel["title"]
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("requests", "error", "latency", "first byte", "fallbacks", "circuit", "health", "rejections",
                  "credits", "quota", "backlog"):
        assert topic in titles, topic


@needs_promtool
def test_rules_pass_promtool_check():
    done = subprocess.run([ops_files.promtool(), "check", "rules", str(ops_files.ALERTS)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
async def test_quiet_gateway_fires_nothing(tmp_path, redis_url):
    m = GatewayMetrics()
    m.refresh(table(), {"logs": Writer(), "ledger": Writer()}, 0, STREAMS)
    before = await exposition(m, redis_url)
    busy(m)
    after = await exposition(m, redis_url)
    done = ops_files.run_rule_tests(before, after, {}, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
async def test_each_trouble_fires_its_alert(tmp_path, redis_url):
    m = GatewayMetrics()
    m.refresh(table(), {"logs": Writer(), "ledger": Writer()}, 0, STREAMS)
    before = await exposition(m, redis_url)
    busy(m, fail_alpha=10)  # half of alpha's attempts fail
    for _ in range(3):
        m.observe(rec(503, provider=None, attempts=0, error="counter_store_unavailable", detail=[]))
    # The database stopped taking writes: rows wait in memory and in the ledger stream.
    m.refresh(table("open"), {"logs": Writer(), "ledger": Writer(dropped=3, pending=20000)}, 0,
              {**STREAMS, "ledger": Stream(backlog=20000)})
    after = await exposition(m, None)  # and the counter store is gone
    after = after.replace("trex_reconcile_mismatched_accounts 0.0", "trex_reconcile_mismatched_accounts 2.0")
    firing = {
        "TrexUpstreamErrorRateHigh": [{"provider": "alpha"}],
        "TrexCircuitOpen": [{"provider": "alpha", "model": "alpha-mini"}],
        "TrexWriterBacklog": [{"writer": "ledger"}],
        "TrexWriterDroppingRows": [{"writer": "ledger"}],
        "TrexDurableStreamBacklog": [{"stream": "ledger"}],
        "TrexCounterStoreUnavailable": [{}],
        "TrexReconcileMismatch": [{}],
        "TrexGatewayErrorRateHigh": [{}],  # 3 of 35 answers are 503s
    }
    done = ops_files.run_rule_tests(before, after, firing, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
