"""The response cache through the whole gateway in process (real Redis, SQL store, the relay hop and
mock upstreams): a hit never reaches a provider, bills nothing but counts against RPM, never crosses
accounts, replays streams as valid SSE, never keeps an error, and a cache that is down serves
requests as usual."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import orjson
import redis.asyncio as aioredis

from tests.integration.gateway import OP, account, chat, code, new_key
from trex_serve.cache.redis_cache import _PUT_LUA, Entry, ResponseCache

CACHED = {"trex": {"cache": {"ttl_s": 60}}}


def sdk(gw, key: str) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=gw._transport, base_url="http://gw/v1")
    return openai.AsyncOpenAI(api_key=key, base_url="http://gw/v1", http_client=http, max_retries=0)


def _requests(gw) -> int:
    return sum(m.stats()["requests"] for m in gw.mocks.values())


async def _usage(gw, acc) -> dict:
    return (await gw.get(f"/admin/v1/accounts/{acc['id']}/usage", headers=OP)).json()


async def _log(gw, acc, request_id: str) -> dict:
    for _ in range(100):  # the log rows travel through a Redis stream into SQL
        await gw.runtime.logs.flush_once()
        rows = (await gw.get(f"/admin/v1/accounts/{acc['id']}/logs?limit=50", headers=OP)).json()["data"]
        row = next((r for r in rows if r["request_id"] == request_id), None)
        if row is not None:
            return row
        await asyncio.sleep(0.05)
    raise AssertionError(f"no log row for {request_id}")


async def test_hit_reaches_no_provider_bills_nothing_and_is_marked(gw):
    acc = await account(gw)
    key = (await new_key(gw, acc))["key"]
    miss = await chat(gw, key, **CACHED)
    assert miss.status_code == 200 and miss.headers["x-trex-cache"] == "miss"
    sent, used = _requests(gw), (await _usage(gw, acc))["quota"]
    hit = await chat(gw, key, **CACHED)
    assert hit.status_code == 200 and hit.headers["x-trex-cache"] == "hit"
    assert hit.content == miss.content  # byte for byte
    assert _requests(gw) == sent  # no provider was called
    assert hit.headers["x-trex-attempts"] == "0" and "x-trex-upstream-provider" not in hit.headers
    assert hit.headers["x-trex-billing"] == "none" and int(hit.headers["x-trex-cache-age"]) >= 0
    after = (await _usage(gw, acc))["quota"]
    assert (after["requests_used"], after["tokens_used"]) == (used["requests_used"], used["tokens_used"])
    row = await _log(gw, acc, hit.headers["x-trex-request-id"])
    assert (row["cache"], row["tokens_in"], row["tokens_out"], row["attempts"]) == ("hit", 0, 0, 0)
    assert (await _log(gw, acc, miss.headers["x-trex-request-id"]))["cache"] == "miss"
    metrics = (await gw.get("/metrics")).text
    assert 'trex_response_cache_total{api="chat",result="hit"}' in metrics


async def test_a_hit_costs_no_credits_and_still_counts_against_rpm(gw):
    acc = await account(gw, credits=5)
    key = (await new_key(gw, acc, limits={"rpm": 3}))["key"]
    first = await chat(gw, key, model="big-model", **CACHED)
    assert first.status_code == 200 and first.headers["x-trex-billing"] == "credits"
    await gw.runtime.ledger.flush_once()
    charged = (await _usage(gw, acc))["credits"]
    hit = await chat(gw, key, model="big-model", **CACHED)
    assert hit.headers["x-trex-cache"] == "hit" and hit.headers["x-ratelimit-remaining-requests"] == "1"
    await gw.runtime.ledger.flush_once()
    assert (await _usage(gw, acc))["credits"] == charged  # the ledger and balance did not move
    assert (await chat(gw, key, model="big-model", **CACHED)).headers["x-trex-cache"] == "hit"
    limited = await chat(gw, key, model="big-model", **CACHED)  # the 4th request in the minute
    assert (limited.status_code, code(limited)) == (429, "rate_limit_exceeded")
    assert int(limited.headers["retry-after"]) >= 1


async def test_never_across_accounts_shared_by_keys_of_one(gw):
    acc = await account(gw)
    key_a, key_b = (await new_key(gw, acc))["key"], (await new_key(gw, acc))["key"]
    other = (await new_key(gw, await account(gw)))["key"]
    assert (await chat(gw, key_a, **CACHED)).headers["x-trex-cache"] == "miss"
    assert (await chat(gw, key_b, **CACHED)).headers["x-trex-cache"] == "hit"
    sent = _requests(gw)
    assert (await chat(gw, other, **CACHED)).headers["x-trex-cache"] == "miss"
    assert _requests(gw) == sent + 1


async def test_every_parameter_that_changes_the_answer_is_in_the_key(gw):
    key = (await new_key(gw, await account(gw, credits=5)))["key"]  # a pinned provider bills credits
    assert (await chat(gw, key, **CACHED)).headers["x-trex-cache"] == "miss"
    for changed in ({"temperature": 0.5}, {"max_tokens": 7}, {"model": "claude-sonnet"},
                    {"trex": {"cache": {"ttl_s": 60}, "routing": {"provider": "beta"}}}):
        r = await chat(gw, key, **{**CACHED, **changed})
        assert (r.status_code, r.headers["x-trex-cache"]) == (200, "miss"), changed
    r = await chat(gw, key, **{"trex": {"cache": {"ttl_s": 5}}})  # a different ttl is the same answer
    assert r.headers["x-trex-cache"] == "hit"
    r = await chat(gw, key, **{"trex": {"cache": {"ttl_s": 0}}})  # off for this request
    assert "x-trex-cache" not in r.headers


async def test_stream_hits_replay_a_valid_sse_stream(gw):
    client = sdk(gw, (await new_key(gw, await account(gw)))["key"])

    async def run() -> tuple[str, dict]:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "stream it"}], stream=True,
            stream_options={"include_usage": True}, extra_body=CACHED)
        text, usage = "", None
        async for chunk in raw.parse():
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                usage = chunk.usage
        return text, {"cache": raw.headers.get("x-trex-cache"), "usage": usage}

    sent = _requests(gw)
    first_text, first = await run()
    second_text, second = await run()
    assert (first["cache"], second["cache"]) == ("miss", "hit")
    assert second_text == first_text and first_text.startswith("Hello from")
    assert second["usage"].total_tokens == first["usage"].total_tokens
    assert _requests(gw) == sent + 1
    # A whole answer is another entry than a stream of the same body.
    whole = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "stream it"}], extra_body=CACHED)
    assert whole.headers["x-trex-cache"] == "miss"


async def test_responses_hits_are_new_stored_responses(gw):
    client = sdk(gw, (await new_key(gw, await account(gw)))["key"])
    first = await client.responses.create(model="gpt-4o-mini", input="cache me", extra_body=CACHED)
    raw = await client.responses.with_raw_response.create(model="gpt-4o-mini", input="cache me", extra_body=CACHED)
    again = raw.parse()
    assert raw.headers["x-trex-cache"] == "hit" and again.output_text == first.output_text
    assert again.id != first.id  # a new response, stored under its own id
    assert (await client.responses.retrieve(again.id)).output_text == first.output_text
    follow = await client.responses.create(model="gpt-4o-mini", input="and then?", previous_response_id=again.id)
    assert follow.previous_response_id == again.id
    # Streamed: the replay is a valid typed stream, ending in response.completed under a new id.
    events = [e async for e in await client.responses.create(model="gpt-4o-mini", input="cache me", stream=True,
                                                                extra_body=CACHED)]
    done = [e async for e in await client.responses.create(model="gpt-4o-mini", input="cache me", stream=True,
                                                              extra_body=CACHED)]
    assert [e.type for e in done] == [e.type for e in events]
    assert done[-1].response.id != events[-1].response.id
    assert done[-1].response.output_text == events[-1].response.output_text


async def test_errors_are_never_cached(gw):
    key = (await new_key(gw, await account(gw)))["key"]
    sent = _requests(gw)
    for _ in range(2):
        r = await chat(gw, key, model="reject-me", **CACHED)
        assert (r.status_code, r.headers["x-trex-cache"]) == (400, "miss")
    assert _requests(gw) == sent + 2
    for m in gw.mocks.values():
        m.control(error_rate=1.0, error_status=503)
    assert (await chat(gw, key, **CACHED)).status_code == 502
    for m in gw.mocks.values():
        m.reset()
    r = await chat(gw, key, **CACHED)
    assert (r.status_code, r.headers["x-trex-cache"]) == (200, "miss")
    # A stream the upstream cut short is not kept either.
    gw.mocks["alpha"].control(reset_mid_stream=True)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "cut"}], "stream": True, **CACHED}
    headers = {"Authorization": f"Bearer {key}"}
    async with gw.stream("POST", "/v1/chat/completions", json=body, headers=headers) as cut:
        _ = [c async for c in cut.aiter_bytes()]
    gw.mocks["alpha"].reset()
    async with gw.stream("POST", "/v1/chat/completions", json=body, headers=headers) as after:
        assert after.headers["x-trex-cache"] == "miss"
        _ = [c async for c in after.aiter_bytes()]


async def test_a_key_default_applies_and_its_change_is_audited(gw):
    acc = await account(gw)
    made = await new_key(gw, acc, cache_ttl_s=120)
    assert made["cache_ttl_s"] == 120
    assert (await chat(gw, made["key"])).headers["x-trex-cache"] == "miss"
    assert (await chat(gw, made["key"])).headers["x-trex-cache"] == "hit"
    r = await gw.patch(f"/admin/v1/keys/{made['id']}", json={"cache_ttl_s": 0}, headers=OP)
    assert r.status_code == 200 and r.json()["cache_ttl_s"] is None
    assert "x-trex-cache" not in (await chat(gw, made["key"])).headers
    audit = (await gw.get("/admin/v1/audit?limit=20", headers=OP)).json()["data"]
    change = next(a for a in audit if a["action"] == "key.update" and a["target_id"] == made["id"])
    assert (change["before"]["cache_ttl_s"], change["after"]["cache_ttl_s"]) == (120, None)
    r = await gw.patch(f"/admin/v1/keys/{made['id']}", json={"cache_ttl_s": -1}, headers=OP)
    assert (r.status_code, r.json()["error"]["param"]) == (400, "cache_ttl_s")
    bad = await chat(gw, made["key"], trex={"cache": {"ttl_s": "long"}})
    assert (bad.status_code, bad.json()["error"]["param"]) == (400, "trex.cache.ttl_s")


async def test_a_cache_that_is_down_never_fails_a_request(gw):
    key = (await new_key(gw, await account(gw)))["key"]
    cache: ResponseCache = gw.runtime.cache
    alive, put = cache.client, cache._put
    dead = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    cache.client, cache._put = dead, dead.register_script(_PUT_LUA)
    try:
        for _ in range(2):
            t0 = time.monotonic()
            r = await chat(gw, key, **CACHED)
            assert (r.status_code, r.headers["x-trex-cache"]) == (200, "miss")
            assert time.monotonic() - t0 < 1.0
        assert not cache.available  # skipped for a while: later requests do not even try
    finally:
        cache.client, cache._put, cache._down_until = alive, put, 0.0
        await dead.aclose()
    assert (await chat(gw, key, **CACHED)).headers["x-trex-cache"] == "miss"
    assert (await chat(gw, key, **CACHED)).headers["x-trex-cache"] == "hit"


async def test_entries_are_bounded_in_size_and_memory(redis_url, key_prefix):
    cache = ResponseCache.from_url(redis_url, key_prefix, max_bytes=4000, max_entry_bytes=1500)
    try:
        assert not await cache.put("acc", "big", Entry("json", b"x" * 2000), 60)  # over one entry's bound
        for i in range(6):
            assert await cache.put("acc", f"d{i}", Entry("json", orjson.dumps({"i": i}) + b" " * 900), 60 + i)
        total = int(await cache.client.get(f"{key_prefix}cache:bytes"))
        assert total <= 4000
        kept = [i for i in range(6) if await cache.get("acc", f"d{i}") is not None]
        assert kept == [2, 3, 4, 5]  # the entries closest to their expiry went first
        ttl = await cache.client.pttl(f"{key_prefix}cache:acc:d5")
        assert 60_000 < ttl <= 65_000  # evicted by TTL too
    finally:
        await cache.client.delete(*[k async for k in cache.client.scan_iter(f"{key_prefix}*")])
        await cache.aclose()
