"""Refusals on Anthropic's routes, each in Anthropic's shape as its SDK reads them (the status's error
class, `error.type`, `request-id`), charged nothing; a failure after a stream began as Anthropic's
`error` event; count_tokens counted as a request (RPM, log row) and billed nothing."""

from __future__ import annotations

import anthropic
import httpx2
import orjson
import pytest

from tests.integration.gateway import OP, account, new_key

HI = [{"role": "user", "content": "hi"}]


def sdk_for(gw, key: str) -> anthropic.AsyncAnthropic:
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gw._transport.app), base_url="http://gw")
    return anthropic.AsyncAnthropic(api_key=key, base_url="http://gw", http_client=http, max_retries=0)


async def charged(gw, acc) -> int:
    return (await gw.get(f"/admin/v1/accounts/{acc['id']}/usage", headers=OP)).json()["credits"]["charged_micro"]


async def refusal(gw, key: str, model: str = "claude-sonnet", **body) -> anthropic.APIStatusError:
    with pytest.raises(anthropic.APIStatusError) as err:
        await sdk_for(gw, key).messages.create(model=model, max_tokens=body.pop("max_tokens", 64), messages=HI,
                                               **body)
    assert err.value.body["type"] == "error" and err.value.response.headers["request-id"].startswith("req_")
    return err.value


async def test_each_refusal_in_anthropic_s_shape_and_nothing_charged(gw):
    acc = await account(gw, credits=5)
    key = await new_key(gw, acc)
    # 401: no key, and a wrong one (x-api-key or Bearer)
    r = await gw.post("/v1/messages", json={"model": "claude-sonnet", "max_tokens": 5, "messages": HI})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert r.headers["request-id"] == r.headers["x-trex-request-id"]
    r = await gw.post("/v1/messages", json={"model": "claude-sonnet", "max_tokens": 5, "messages": HI},
                      headers={"Authorization": "Bearer trex-not-a-key"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    # 400 naming the field: messages not a list, a block without a type, max_tokens missing
    for body, field in (({"messages": "hi"}, "messages"),
                        ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages.0.content.0.type"),
                        ({"max_tokens": None}, "max_tokens")):
        payload = {"model": "claude-sonnet", "max_tokens": 5, "messages": HI, **body}
        r = await gw.post("/v1/messages", json={k: v for k, v in payload.items() if v is not None},
                          headers={"x-api-key": key["key"]})
        err = r.json()["error"]
        assert (r.status_code, err["type"]) == (400, "invalid_request_error") and err["message"].startswith(field)
    # 404: a model that is not in the catalog
    err = await refusal(gw, key["key"], model="claude-nonexistent-1")
    assert isinstance(err, anthropic.NotFoundError) and err.body["error"]["type"] == "not_found_error"
    # 413: a body over the limit, refused before it is read whole
    r = await gw.post("/v1/messages", content=b'{"model": "claude-sonnet", "x": "' + b"x" * (5 << 20) + b'"}',
                      headers={"x-api-key": key["key"], "content-type": "application/json"})
    assert (r.status_code, r.json()["error"]["type"]) == (413, "request_too_large")
    assert r.headers["request-id"].startswith("req_")
    # the upstream's own 4xx (Anthropic refusing the request) reaches the client as Anthropic's
    gw.mocks["alpha"].control(fail_next=1, error_status=400)
    err = await refusal(gw, key["key"])
    assert isinstance(err, anthropic.BadRequestError) and "alpha injected 400" in err.body["error"]["message"]
    assert err.response.headers["x-trex-upstream-provider"] == "claude"
    assert await charged(gw, acc) == 0


async def test_permission_rate_and_billing_refusals(gw):
    acc = await account(gw, credits=5)
    key = await new_key(gw, acc, limits={"rpm": 1})
    # 403: the key is not for this address
    await gw.patch(f"/admin/v1/keys/{key['id']}", json={"risk": {"allowed_ips": ["203.0.113.0/24"]}}, headers=OP)
    err = await refusal(gw, key["key"])
    assert isinstance(err, anthropic.PermissionDeniedError) and err.body["error"]["type"] == "permission_error"
    await gw.patch(f"/admin/v1/keys/{key['id']}", json={"risk": None}, headers=OP)
    # 429 with retry-after: the key's one request a minute is used
    await sdk_for(gw, key["key"]).messages.create(model="claude-sonnet", max_tokens=64, messages=HI)
    err = await refusal(gw, key["key"])
    assert isinstance(err, anthropic.RateLimitError) and err.body["error"]["type"] == "rate_limit_error"
    assert int(err.response.headers["retry-after"]) >= 1
    # 402 billing_error: a premium model with no credits; Claude Code's 64,000 max_tokens on a
    # funded account is reserved (within the context window), not refused
    poor = await new_key(gw, await account(gw))
    err = await refusal(gw, poor["key"], model="cached-claude", max_tokens=64000, timeout=60)
    assert err.status_code == 402 and err.body["error"]["type"] == "billing_error"
    rich = await new_key(gw, acc)
    ok = await sdk_for(gw, rich["key"]).messages.create(model="cached-claude", max_tokens=64000, messages=HI,
                                                        timeout=60)
    assert ok.stop_reason == "end_turn"


@pytest.mark.parametrize(("model", "mock"), [("claude-sonnet", "alpha"), ("gpt-4o-mini", "alpha")])
async def test_a_stream_cut_after_it_began_ends_with_anthropic_s_error_event(gw, model, mock):
    acc = await account(gw, credits=5)
    key = await new_key(gw, acc)
    gw.mocks[mock].control(reset_mid_stream=True, stream_chunks=8)
    async with gw.stream("POST", "/v1/messages", headers={"x-api-key": key["key"]},
                         json={"model": model, "max_tokens": 64, "stream": True, "messages": HI}) as r:
        raw = b"".join([chunk async for chunk in r.aiter_bytes()])
    assert r.status_code == 200
    events = [line for line in raw.split(b"\n") if line.startswith(b"event: ")]
    assert events[0] == b"event: message_start" and events[-1] == b"event: error", raw[-400:]
    last = orjson.loads([line for line in raw.split(b"\n") if line.startswith(b"data: ")][-1][6:])
    assert last["type"] == "error" and last["error"]["type"] == "api_error"
    with pytest.raises(anthropic.APIStatusError):  # the SDK raises it, not a parse error
        async with sdk_for(gw, key["key"]).messages.stream(model=model, max_tokens=64, messages=HI) as stream:
            async for _ in stream:
                pass


async def test_count_tokens_is_counted_as_a_request_and_billed_nothing(gw):
    acc = await account(gw, credits=5)
    key = await new_key(gw, acc, limits={"rpm": 3})
    client = sdk_for(gw, key["key"])
    for model in ("claude-sonnet", "gpt-4o-mini"):  # the provider's count, then the gateway's estimate
        raw = await client.messages.with_raw_response.count_tokens(model=model, messages=HI)
        assert (await raw.parse()).input_tokens > 0
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    await client.messages.create(model="claude-sonnet", max_tokens=16, messages=HI)
    with pytest.raises(anthropic.RateLimitError):  # the fourth request this minute
        await client.messages.count_tokens(model="claude-sonnet", messages=HI)
    await gw.runtime.logs.flush_once()
    rows = (await gw.get(f"/admin/v1/accounts/{acc['id']}/logs", headers=OP)).json()["data"]
    by_api = sorted((row["api"], row["status"]) for row in rows)
    assert by_api == [("count_tokens", 200), ("count_tokens", 200), ("count_tokens", 429), ("messages", 200)]
    counted = [row for row in rows if row["api"] == "count_tokens" and row["provider"] == "claude"]
    assert counted and counted[0]["attempts"] == 1 and counted[0]["credits_charged"] == 0
    usage = (await gw.get(f"/admin/v1/accounts/{acc['id']}/usage", headers=OP)).json()
    assert usage["quota"]["requests_used"] == 1  # the message alone
