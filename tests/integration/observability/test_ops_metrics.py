"""The series the alert rules page on (deploy/prometheus/alerts.yml): failed upstream attempts by
reason, the counter store's reachability and the last billing reconcile, as /metrics shows them."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from tests.integration.gateway import OP, account, chat, new_key
from tests.integration.observability.test_metrics import value
from trex_serve.local.embedded import free_port
from trex_serve.observability.metrics import GatewayMetrics
from trex_serve.observability.metrics_exchange import MetricsExchange


@pytest.fixture
def database_url(tmp_path):
    # One store is enough here: these tests are about metrics, not SQL dialects.
    return f"sqlite:///{tmp_path / 'trex.db'}"


async def test_failed_attempts_counted_by_provider_and_reason(gw):
    acc = await account(gw)
    key = await new_key(gw, acc)
    gw.mocks["alpha"].control(fail_next=1, error_status=503)
    assert (await chat(gw, key["key"])).headers["x-trex-attempts"] == "2"
    for m in gw.mocks.values():
        m.control(fail_next=1, error_status=500)
    assert (await chat(gw, key["key"])).status_code == 502
    text = (await gw.get("/metrics", headers=OP)).content
    assert value(text, "trex_upstream_errors_total", provider="alpha", reason="http_503") == 1
    assert value(text, "trex_upstream_errors_total", provider="alpha", reason="http_500") == 1
    assert value(text, "trex_upstream_errors_total", provider="beta", reason="http_500") == 1
    assert value(text, "trex_upstream_attempts_total", provider="beta") == 2
    assert value(text, "trex_counter_store_up") == 1


async def test_reconcile_outcome_reaches_metrics(gw, database_url, redis_url):
    from trex_serve.local.billing_reconcile import reconcile

    prefix = gw.runtime.counters.prefix
    text = (await gw.get("/metrics")).content
    assert value(text, "trex_reconcile_last_run_timestamp_seconds") == 0  # never run yet
    acc = await account(gw, credits=1)
    key = await new_key(gw, acc)
    assert (await chat(gw, key["key"], model="big-model")).status_code == 200  # loads the balance into Redis
    await gw.runtime.ledger.flush_once()
    await gw.runtime.counters.grant(acc["id"], 77)  # Redis drifts from the ledger
    report = await reconcile(database_url, redis_url, "x", prefix=prefix)
    assert report["mismatched"] == 1
    text = (await gw.get("/metrics")).content
    assert value(text, "trex_reconcile_mismatched_accounts") == 1
    assert value(text, "trex_reconcile_last_run_timestamp_seconds") > 0
    await reconcile(database_url, redis_url, "x", fix=True, prefix=prefix)
    assert value((await gw.get("/metrics")).content, "trex_reconcile_mismatched_accounts") == 0


async def test_scrape_without_the_counter_store_says_so():
    dead = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    metrics = GatewayMetrics()
    ex = MetricsExchange(dead, "t:", "solo", metrics)
    try:
        text = await ex.render()
    finally:
        await dead.aclose()
    assert value(text, "trex_counter_store_up") == 0
    assert value(text, "trex_ingress_replicas") == 1
