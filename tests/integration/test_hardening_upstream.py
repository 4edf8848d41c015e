"""Hardening: upstreams that misbehave. Malformed answers, cut streams, endless streams, slowloris
and giant bodies are bounded by the pool's limits; before the first byte they fall back, after it
the client gets an error event and pays for what was delivered; nothing hangs."""

from __future__ import annotations

import asyncio
import time
import tracemalloc

import pytest

from tests.integration.gateway import account, chat, code, new_key
from tests.integration.test_hardening_outages import gateway
from trex_serve.hop import pool_server

PIN_ALPHA = {"routing": {"provider": "alpha"}}


@pytest.fixture
async def gw(mocks, tmp_path, redis_url, key_prefix):
    async with gateway(mocks, tmp_path, f"sqlite:///{tmp_path / 'trex.db'}", redis_url, key_prefix) as client:
        yield client


@pytest.fixture
async def user(gw):
    acc = await account(gw, credits=100)
    key = await new_key(gw, acc)
    return acc, key


async def charged(gw, acc, key=None) -> int:
    """The account's ledger sum once ``key``'s requests have settled and the ledger stream is
    drained into SQL. A stream's settlement runs shielded as the stream closes, and a drain pass
    the database refused for a moment leaves its rows pending until the next pass: reading before
    either lands would count a charge in the next reading instead (CI once read 0, then both)."""
    deadline = time.monotonic() + 5
    if key is not None:
        while await gw.runtime.counters.inflight(key["id"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    while not await gw.runtime.ledger.flush_once() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return gw.runtime.repo.ledger_sum(acc["id"])


async def bounded(coro, seconds=10.0):
    return await asyncio.wait_for(coro, seconds)


async def test_malformed_json_200_is_retryable_and_falls_back(gw, user):
    acc, key = user
    gw.mocks["alpha"].control(malformed_rate=1.0)
    r = await bounded(chat(gw, key["key"], model="big-model"))
    assert r.status_code == 200, r.text
    assert r.headers["x-trex-upstream-provider"] == "beta"
    assert r.json()["choices"][0]["message"]["content"].startswith("Hello from beta")
    # Both broken: 502 with the attempts, nothing charged.
    gw.mocks["beta"].control(malformed_rate=1.0)
    before = await charged(gw, acc, key)
    r = await bounded(chat(gw, key["key"], model="big-model"))
    assert r.status_code in (502, 503) and code(r) == "upstream_unavailable", r.text
    assert {a["error"] for a in r.json()["error"]["trex"]["attempts"]} <= {"bad_response", None}
    assert await charged(gw, acc, key) == before
    assert await gw.runtime.counters.inflight(key["id"]) == 0


async def test_stream_reset_mid_stream_gives_error_event_and_bills_delivered(gw, user):
    acc, key = user
    start = await charged(gw, acc, key)
    r = await bounded(chat(gw, key["key"], model="big-model", stream=True, trex=PIN_ALPHA))
    assert r.status_code == 200
    full = start - await charged(gw, acc, key)
    assert full > 0 and b"[DONE]" in r.content

    gw.mocks["alpha"].control(reset_mid_stream=True, stream_chunks=8)
    before = await charged(gw, acc, key)
    t0 = time.monotonic()
    r = await bounded(chat(gw, key["key"], model="big-model", stream=True, trex=PIN_ALPHA))
    assert time.monotonic() - t0 < 5, "a cut stream must end promptly"
    assert r.status_code == 200  # the first bytes were already on their way: no fallback after them
    body = r.content
    assert b'"model":"alpha-big"' in body and b"upstream_stream_interrupted" in body
    assert b"[DONE]" not in body
    partial = before - await charged(gw, acc, key)
    assert partial > 0, "what was delivered is billed"
    assert await gw.runtime.counters.inflight(key["id"]) == 0


async def test_cut_stream_bills_no_more_than_the_whole_answer(gw, user):
    acc, key = user
    start = await charged(gw, acc, key)
    await bounded(chat(gw, key["key"], model="big-model", stream=True, trex=PIN_ALPHA))
    full = start - await charged(gw, acc, key)
    gw.mocks["alpha"].control(reset_mid_stream=True, stream_chunks=8)
    before = await charged(gw, acc, key)
    await bounded(chat(gw, key["key"], model="big-model", stream=True, trex=PIN_ALPHA))
    partial = before - await charged(gw, acc, key)
    assert 0 < partial <= full, (partial, full)


async def test_endless_stream_is_cut_at_the_stream_time_limit(gw, user, monkeypatch):
    acc, key = user
    monkeypatch.setattr(pool_server, "MAX_STREAM_SECONDS", 1.0)
    # One chunk every millisecond: the upstream never pauses long enough for a read timeout.
    gw.mocks["alpha"].control(endless_stream=True, token_interval_ms=1)
    before = await charged(gw, acc, key)
    t0 = time.monotonic()
    r = await bounded(chat(gw, key["key"], model="big-model", stream=True, trex=PIN_ALPHA), 15)
    elapsed = time.monotonic() - t0
    assert 0.9 < elapsed < 6, elapsed
    assert r.status_code == 200 and b"upstream_stream_time_limit" in r.content
    assert r.content.count(b" more") > 10
    assert before - await charged(gw, acc, key) > 0, "what was delivered is billed"
    assert await gw.runtime.counters.inflight(key["id"]) == 0
    assert gw.pool.inflight == 0


def test_stream_limit_can_be_set_per_provider():
    from trex_serve.catalog import Provider

    p = Provider(name="x", base_url="http://x")
    assert pool_server.max_stream_seconds(p) == pool_server.MAX_STREAM_SECONDS
    object.__setattr__(p, "max_stream_s", 2.5) if not hasattr(p, "max_stream_s") else setattr(p, "max_stream_s", 2.5)
    assert pool_server.max_stream_seconds(p) == 2.5


@pytest.mark.parametrize("stream", [False, True])
async def test_slowloris_upstream_first_byte_timeout_falls_back(gw, user, stream):
    acc, key = user
    if stream:
        gw.mocks["alpha"].control(first_byte_delay_ms=4000)  # headers at once, then nothing
    else:
        gw.mocks["alpha"].control(latency_ms=4000)  # not even headers
    t0 = time.monotonic()
    r = await bounded(chat(gw, key["key"], model="big-model", stream=stream))
    elapsed = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert r.headers["x-trex-upstream-provider"] == "beta"
    assert r.headers["x-trex-attempts"] == "2"
    assert elapsed < 3.5, "the first-byte timeout (1.5 s in the test catalog) bounds the wait"
    if stream:
        assert b'"model":"beta-big"' in r.content and b"alpha-big" not in r.content


async def test_giant_response_is_a_retryable_failure_without_buffering_it(gw, user, monkeypatch):
    acc, key = user
    monkeypatch.setattr(pool_server, "MAX_RESPONSE_BYTES", 1024 * 1024)
    gw.mocks["alpha"].control(giant_body_bytes=24 * 1024 * 1024)
    tracemalloc.start()
    try:
        r = await bounded(chat(gw, key["key"], model="big-model"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status_code == 200, r.text
    assert r.headers["x-trex-upstream-provider"] == "beta"
    attempts = r.headers["x-trex-attempts"]
    assert attempts == "2"
    assert peak < 12 * 1024 * 1024, f"peak {peak} bytes: the pool must stop reading at the limit"
    # Without a fallback the client gets 502 upstream_unavailable, not a 500 and not the body.
    r = await bounded(chat(gw, key["key"], model="big-model", trex=PIN_ALPHA))
    assert r.status_code == 502 and code(r) == "upstream_unavailable"
    assert r.json()["error"]["trex"]["attempts"][0]["error"] == "bad_response"
    assert len(r.content) < 10_000


async def test_giant_sse_event_is_cut_without_forwarding_it(gw, user, monkeypatch):
    acc, key = user
    monkeypatch.setattr(pool_server, "MAX_SSE_EVENT_BYTES", 512 * 1024)
    gw.mocks["alpha"].control(giant_sse_line_bytes=16 * 1024 * 1024)
    r = await bounded(chat(gw, key["key"], model="big-model", stream=True, trex=PIN_ALPHA))
    assert r.status_code == 200
    assert b"upstream_stream_event_too_large" in r.content
    assert len(r.content) < 64 * 1024, len(r.content)
    assert await gw.runtime.counters.inflight(key["id"]) == 0
