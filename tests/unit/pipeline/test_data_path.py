"""The data path without Ray: FastAPI app or direct data server → pipeline → relay hop (real HTTP) → pool server →
mock upstream processes. Routing, fallback, streaming and error envelopes."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from tests.fakes import data_path_client
from tests.helpers import write_catalog
from trex_serve.catalog import load_catalog


@pytest.fixture(params=["fastapi", "direct"])
async def gateway(mocks, tmp_path, request):
    """Every test twice: through the FastAPI app Serve runs, and through the direct data server the
    front proxy calls (web/data_server.py); both must answer alike."""
    for m in mocks.values():
        m.reset()
    catalog = load_catalog(write_catalog(tmp_path / "catalog.yaml", mocks))
    async with data_path_client(catalog, front=request.param) as client:
        yield client


def sse_text(raw: bytes) -> str:
    out = []
    for event in raw.split(b"\n\n"):
        if event.startswith(b"data: {"):
            data = orjson.loads(event[6:])
            for choice in data.get("choices") or []:
                out.append(choice["delta"].get("content") or "")
    return "".join(out)


def chat(model="gpt-4o-mini", **extra):
    return {"model": model, "messages": [{"role": "user", "content": "hi there"}], **extra}


async def test_non_stream_answer_carries_trex_headers_and_usage(gateway, mocks):
    r = await gateway.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200, r.text
    assert r.headers["x-trex-upstream-provider"] == "alpha"
    assert r.headers["x-trex-upstream-model"] == "alpha-mini"
    assert r.headers["x-trex-attempts"] == "1"
    assert r.headers["x-trex-request-id"].startswith("req_")
    assert "Hello from alpha" in r.json()["choices"][0]["message"]["content"]
    assert mocks["alpha"].stats()["last_model"] == "alpha-mini"
    [s] = gateway.gate.settlements
    assert s.success and s.completion_tokens > 0


@pytest.mark.parametrize("front", ["fastapi", "direct"])
async def test_an_upstreams_cookie_never_rides_along_on_later_requests(mocks, tmp_path, front):
    """One pool session serves every account: what an upstream sets for one must not reach it again
    on another's request. (By host name: a cookie jar ignores cookies from a bare IP address.)"""
    for m in mocks.values():
        m.reset()
    path = write_catalog(tmp_path / "catalog.yaml", mocks)
    path.write_text(path.read_text().replace("127.0.0.1", "localhost"))
    mocks["alpha"].control(set_cookie="session=account-a; Path=/")
    async with data_path_client(load_catalog(path), front=front) as client:
        for _ in range(3):
            r = await client.post("/v1/chat/completions", json=chat())
            assert r.status_code == 200, r.text
            assert "set-cookie" not in r.headers
    assert mocks["alpha"].stats()["requests"] == 3
    assert mocks["alpha"].stats()["cookies_received"] == 0


async def test_unknown_fields_pass_through_untouched(gateway, mocks):
    r = await gateway.post("/v1/chat/completions", json=chat(some_new_param={"x": [1, 2]}, temperature=0.2))
    assert r.status_code == 200
    body = mocks["alpha"].stats()["last_body"]
    assert body["some_new_param"] == {"x": [1, 2]} and body["temperature"] == 0.2
    assert "trex" not in body


@pytest.mark.parametrize("fault", [
    {"fail_next": 1, "error_status": 503},
    {"fail_next": 1, "error_status": 429},
    {"fail_next": 1, "error_status": 500},
    {"reset_rate": 1.0},
    {"hang_rate": 1.0},
])
async def test_fallback_on_retryable_failure_uses_next_candidate(gateway, mocks, fault):
    mocks["alpha"].control(**fault)
    r = await gateway.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200, r.text
    assert r.headers["x-trex-upstream-provider"] == "beta"
    assert r.headers["x-trex-attempts"] == "2"
    assert len(gateway.gate.settlements) == 1 and gateway.gate.settlements[0].success


async def test_non_retryable_4xx_passes_through_without_fallback(gateway, mocks):
    mocks["alpha"].control(fail_next=1, error_status=400)
    r = await gateway.post("/v1/chat/completions", json=chat())
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_request_error"
    assert r.headers["x-trex-attempts"] == "1"
    assert mocks["beta"].stats()["requests"] == 0
    assert [s.success for s in gateway.gate.settlements] == [False]


async def test_all_failed_gives_502_with_attempts(gateway, mocks):
    mocks["alpha"].control(error_rate=1.0, error_status=503)
    mocks["beta"].control(error_rate=1.0, error_status=502)
    r = await gateway.post("/v1/chat/completions", json=chat())
    assert r.status_code == 502
    err = r.json()["error"]
    assert err["code"] == "upstream_unavailable"
    assert [(a["provider"], a["status"]) for a in err["trex"]["attempts"]] == [("alpha", 503), ("beta", 502)]
    assert [s.success for s in gateway.gate.settlements] == [False]


async def test_explicit_fallbacks_come_before_the_catalog_chain(gateway, mocks):
    mocks["alpha"].control(fail_next=1, error_status=503)
    body = chat("gpt-4o-mini", trex={"routing": {"fallbacks": [{"provider": "beta", "model": "beta-big"}]}})
    r = await gateway.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert (r.headers["x-trex-upstream-provider"], r.headers["x-trex-upstream-model"]) == ("beta", "beta-big")


async def test_pinned_provider_never_falls_back(gateway, mocks):
    mocks["beta"].control(fail_next=1, error_status=503)
    r = await gateway.post("/v1/chat/completions", json=chat("beta/beta-mini"))
    assert r.status_code == 502
    assert mocks["alpha"].stats()["requests"] == 0
    r = await gateway.post("/v1/chat/completions", json=chat(trex={"routing": {"provider": "beta"}}))
    assert r.status_code == 200 and r.headers["x-trex-upstream-provider"] == "beta"


async def test_stream_relays_sse_and_done(gateway, mocks):
    async with gateway.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join([c async for c in r.aiter_bytes()])
    events = [e for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]"
    assert sse_text(raw).startswith("Hello from alpha")
    # We asked the upstream for usage on the client's behalf; the client did not ask, so no usage chunk.
    assert not any(b'"usage"' in e for e in events)
    await asyncio.sleep(0.05)
    [s] = gateway.gate.settlements
    assert s.success and s.completion_tokens > 0 and s.prompt_tokens > 0


async def test_stream_include_usage_is_honoured(gateway):
    async with gateway.stream("POST", "/v1/chat/completions",
                              json=chat(stream=True, stream_options={"include_usage": True})) as r:
        raw = b"".join([c async for c in r.aiter_bytes()])
    assert b'"usage":{"prompt_tokens"' in raw


async def test_stream_falls_back_before_first_byte(gateway, mocks):
    mocks["alpha"].control(first_byte_delay_ms=3000)
    async with gateway.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
        assert r.status_code == 200
        assert r.headers["x-trex-upstream-provider"] == "beta"
        raw = b"".join([c async for c in r.aiter_bytes()])
    assert sse_text(raw).startswith("Hello from beta")


async def test_stream_cut_after_first_byte_is_not_retried(gateway, mocks):
    mocks["alpha"].control(reset_mid_stream=True)
    async with gateway.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
        raw = b"".join([c async for c in r.aiter_bytes()])
    assert b"upstream_stream_interrupted" in raw
    assert mocks["beta"].stats()["requests"] == 0


async def test_circuit_opens_then_recovers(gateway, mocks):
    mocks["alpha"].control(error_rate=1.0, error_status=503)
    for _ in range(6):
        r = await gateway.post("/v1/chat/completions", json=chat())
        assert r.status_code == 200
    assert gateway.tracker.health("alpha", "alpha-mini").state == "open"
    before = mocks["alpha"].stats()["requests"]
    r = await gateway.post("/v1/chat/completions", json=chat())
    assert r.headers["x-trex-attempts"] == "1" and r.headers["x-trex-upstream-provider"] == "beta"
    assert mocks["alpha"].stats()["requests"] == before  # skipped while open


async def test_upstream_retry_after_becomes_the_cooldown(gateway, mocks):
    mocks["alpha"].control(fail_next=1, error_status=429, retry_after=30)
    r = await gateway.post("/v1/chat/completions", json=chat())
    assert r.headers["x-trex-upstream-provider"] == "beta"
    h = gateway.tracker.health("alpha", "alpha-mini")
    assert h.state == "open" and h.open_until - __import__("time").time() > 25


@pytest.mark.parametrize("body,param", [
    (b"{not json", None),
    (b'{"model": "gpt-4o-mini"}', "messages"),
    (b'{"model": "gpt-4o-mini", "messages": [], "stream": false}', "messages"),
    (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}', "max_tokens"),
    (b'[1, 2]', None),
])
async def test_bad_input_gets_invalid_request_error(gateway, body, param):
    r = await gateway.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_request_error" and err["param"] == param
    assert r.headers["x-trex-request-id"] == err["trex"]["request_id"]
    assert gateway.gate.admitted == 0


async def test_unknown_model_is_404(gateway):
    r = await gateway.post("/v1/chat/completions", json=chat("no-such-model"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_oversized_body_is_413(gateway):
    r = await gateway.post("/v1/chat/completions", json=chat(padding="x" * 70_000))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
