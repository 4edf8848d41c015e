"""The direct data server's own rules (web/data_server.py): only the front proxy may call it, the
client is who the front proxy says, and what it does not serve is refused in the envelope."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.fakes import data_path_client
from tests.helpers import write_catalog
from trex_serve.catalog import load_catalog
from trex_serve.errors import ServiceUnavailable
from trex_serve.web.data_server import HEALTH_PATH, forwarded_client
from trex_serve.web.front_id import AUTH_HEADER


@pytest.fixture
async def direct(mocks, tmp_path):
    catalog = load_catalog(write_catalog(tmp_path / "catalog.yaml", mocks))
    async with data_path_client(catalog, front="direct") as client:
        yield client


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def test_without_the_front_signature_nothing_is_admitted(direct):
    for headers in ({AUTH_HEADER: "guess"}, {AUTH_HEADER: ""}):
        r = await direct.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    async with httpx.AsyncClient(base_url=str(direct.base_url)) as bare:
        r = await bare.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 403
        assert (await bare.get(HEALTH_PATH)).status_code == 200, "the health check needs no signature"
    assert direct.gate.admitted == 0


async def test_routes_it_does_not_serve_are_refused_in_the_envelope(direct):
    r = await direct.post("/admin/v1/accounts", json={})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert r.headers["x-trex-request-id"].startswith("req_")
    r = await direct.post("/v1/chat/completions", content=b"x" * (64 * 1024 + 1))
    assert r.status_code == 413
    r = await direct.post("/v1/chat/completions", json=CHAT, headers={"X-Upstream-Api-Key": "has space"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Upstream-Api-Key"
    assert direct.gate.admitted == 0


async def test_refusals_on_anthropic_s_route_come_in_anthropic_s_shape(direct):
    for kwargs, status, kind in (({"content": b"x" * (64 * 1024 + 1)}, 413, "request_too_large"),
                                 ({"json": {}, "headers": {"X-Upstream-Api-Key": "has space"}}, 400,
                                  "invalid_request_error")):
        r = await direct.post("/v1/messages", **kwargs)
        assert (r.status_code, r.json()["type"], r.json()["error"]["type"]) == (status, "error", kind)
        assert r.headers["request-id"] == r.headers["x-trex-request-id"]
    assert direct.gate.admitted == 0


def test_the_client_is_the_last_address_the_front_proxy_wrote():
    assert forwarded_client("203.0.113.7", "127.0.0.1") == "203.0.113.7"
    assert forwarded_client("10.0.0.1, 2001:db8::1", "127.0.0.1") == "2001:db8::1"
    assert forwarded_client("not-an-ip", "127.0.0.1") == "127.0.0.1"
    assert forwarded_client(None, None) == "unknown"


async def test_a_whole_answer_leaves_once_its_settlement_is_sent_not_when_it_is_answered(direct):
    direct.gate.settle_lag_s = 0.3
    r = await direct.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and direct.gate.events == ["settle sent"]
    for _ in range(100):
        if direct.gate.events == ["settle sent", "settle replied"]:
            break
        await asyncio.sleep(0.02)
    assert direct.gate.events == ["settle sent", "settle replied"]


async def test_a_settlement_that_cannot_be_sent_fails_the_request_as_before(direct):
    direct.gate.settle_error = ServiceUnavailable("counter store unavailable", code="counter_store_unavailable")
    r = await direct.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and r.json()["error"]["code"] == "counter_store_unavailable"


async def test_a_settlement_lost_after_the_answer_left_still_leaves_its_record(direct):
    direct.gate.reply_error = ServiceUnavailable("counter store unavailable", code="counter_store_unavailable")
    r = await direct.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    rid = r.headers["x-trex-request-id"]
    for _ in range(100):
        if any(rec.request_id == rid for rec in direct.records):
            break
        await asyncio.sleep(0.02)
    (rec,) = [rec for rec in direct.records if rec.request_id == rid]
    assert rec.status == 200 and rec.credits_charged == 0
