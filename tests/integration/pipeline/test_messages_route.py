"""Anthropic's Messages API at the front door, driven by the official `anthropic` SDK against the
whole gateway in process: pass-through to an anthropic-format provider, translation for an
openai-format one, the same admission, billing and logs, and refusals in Anthropic's shape."""

from __future__ import annotations

import anthropic
import httpx2  # the anthropic SDK's own fork of httpx
import orjson
import pytest

from tests.integration.gateway import OP, account, new_key

SYSTEM = [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]


def asgi_client(gw) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gw._transport.app), base_url="http://gw")


@pytest.fixture
async def sdk(gw):
    acc = await account(gw, credits=5)
    key = (await new_key(gw, acc))["key"]
    http = asgi_client(gw)
    client = anthropic.AsyncAnthropic(api_key=key, base_url="http://gw", http_client=http, max_retries=0)
    client.account, client.key, client.gw = acc, key, gw
    yield client
    await http.aclose()


async def test_anthropic_format_provider_gets_the_body_as_sent(sdk):
    gw = sdk.gw
    raw = await sdk.messages.with_raw_response.create(
        model="claude-sonnet-4-5-20250929", max_tokens=8192, system=SYSTEM,
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi",
                                                "cache_control": {"type": "ephemeral"}}]}],
        metadata={"user_id": "user_abc"}, extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"})
    message = await raw.parse()
    assert message.content[0].text.startswith("Hello from alpha") and message.stop_reason == "end_turn"
    assert raw.headers["x-trex-upstream-provider"] == "claude" and raw.headers["request-id"].startswith("req_")
    stats = gw.mocks["alpha"].stats()
    sent = stats["last_body"]
    assert sent["model"] == "claude-sonnet-4-5"  # the alias resolved to the catalog's upstream model
    assert sent["system"] == SYSTEM and sent["max_tokens"] == 8192 and sent["metadata"] == {"user_id": "user_abc"}
    assert sent["messages"][0]["content"][0]["cache_control"] == {"type": "ephemeral"}
    headers = {k.lower(): v for k, v in stats["last_headers"].items()}
    assert headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert headers["anthropic-version"] == raw.http_request.headers["anthropic-version"]  # the client's own


async def test_stream_passes_anthropic_events_through_and_bills_the_classes(sdk):
    gw = sdk.gw
    gw.mocks["alpha"].control(usage={"input_tokens": 1200, "cache_read_input_tokens": 30000,
                                     "cache_creation_input_tokens": 2000, "output_tokens": 500,
                                     "cache_creation": {"ephemeral_5m_input_tokens": 1500,
                                                        "ephemeral_1h_input_tokens": 500}})
    # Claude Code's max_tokens: reserved within the balance and the model's context window, not refused
    async with sdk.messages.stream(model="cached-claude", max_tokens=64000, system=SYSTEM,
                                   messages=[{"role": "user", "content": "stream please"}]) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text.startswith("Hello from alpha") and final.usage.cache_read_input_tokens == 30000
    await gw.runtime.ledger.flush_once()
    await gw.runtime.logs.flush_once()
    acc = sdk.account["id"]
    ledger = (await gw.get(f"/admin/v1/accounts/{acc}/ledger", headers=OP)).json()["data"]
    assert [e["amount_micro"] for e in ledger if e["kind"] == "charge"] == [-28725]
    logs = (await gw.get(f"/admin/v1/accounts/{acc}/logs", headers=OP)).json()["data"]
    assert logs[0]["tokens"]["cache_read"] == 30000


async def test_openai_format_provider_is_translated_both_ways(sdk):
    message = await sdk.messages.create(model="haiku", max_tokens=256, system="Be brief.",
                                        messages=[{"role": "user", "content": "hello there"}])
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text.startswith("Hello from")
    assert message.stop_reason == "end_turn" and message.usage.input_tokens > 0
    sent = sdk.gw.mocks["alpha"].stats()["last_body"]
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."} and sent["max_tokens"] == 256

    async with sdk.messages.stream(model="gpt-4o-mini", max_tokens=256,
                                   messages=[{"role": "user", "content": "stream"}]) as stream:
        events = [e.type async for e in stream]
        final = await stream.get_final_message()
    assert events[0] == "message_start" and "content_block_delta" in events and events[-1] == "message_stop"
    assert final.content[0].text.startswith("Hello from") and final.usage.output_tokens > 0


async def test_tool_round_trip_through_an_openai_format_provider(sdk):
    tools = [{"name": "lookup", "description": "look it up",
              "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}}}]
    first = await sdk.messages.create(model="gpt-4o-mini", max_tokens=256, tools=tools,
                                      tool_choice={"type": "tool", "name": "lookup"},
                                      messages=[{"role": "user", "content": "find trex"}])
    call = first.content[0]
    assert first.stop_reason == "tool_use" and call.type == "tool_use" and call.name == "lookup"
    assert call.input == {"query": "find trex"}
    second = await sdk.messages.create(model="gpt-4o-mini", max_tokens=256, tools=tools, messages=[
        {"role": "user", "content": "find trex"},
        {"role": "assistant", "content": [c.model_dump() for c in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "not found",
                                      "is_error": True}]}])
    assert second.content[0].text
    sent = sdk.gw.mocks["alpha"].stats()["last_body"]["messages"]
    assert sent[1]["tool_calls"][0]["id"] == call.id
    assert sent[2] == {"role": "tool", "tool_call_id": call.id, "content": "Error: not found"}


async def test_refusals_come_in_anthropic_s_shape_and_cost_nothing(sdk, gw):
    r = await gw.post("/v1/messages", json={"model": "claude-sonnet", "messages": [{"role": "user", "content": "x"}]},
                      headers={"x-api-key": sdk.key})
    assert (r.status_code, r.json()["type"], r.json()["error"]["type"]) == (400, "error", "invalid_request_error")
    assert r.json()["error"]["message"].startswith("max_tokens")
    with pytest.raises(anthropic.NotFoundError) as err:
        await sdk.messages.create(model="no-such-model", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert err.value.body["error"]["type"] == "not_found_error"
    bad = anthropic.AsyncAnthropic(api_key="trex-wrong", base_url="http://gw", max_retries=0,
                                   http_client=asgi_client(gw))
    with pytest.raises(anthropic.AuthenticationError) as err:
        await bad.messages.create(model="claude-sonnet", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert err.value.body["error"]["type"] == "authentication_error"
    for m in gw.mocks.values():
        m.control(error_rate=1.0, error_status=503)
    with pytest.raises(anthropic.APIStatusError) as err:
        await sdk.messages.create(model="claude-sonnet", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 529 and err.value.body["error"]["type"] == "overloaded_error"
    assert err.value.response.headers["request-id"].startswith("req_")
    usage = (await gw.get(f"/admin/v1/accounts/{sdk.account['id']}/usage", headers=OP)).json()
    assert usage["credits"]["charged_micro"] == 0


async def test_count_tokens_and_head_root(sdk, gw):
    # An anthropic-format route: the provider's own count (the mock counts a token per 3 characters)
    raw = await sdk.messages.with_raw_response.count_tokens(
        model="claude-sonnet", messages=[{"role": "user", "content": "x" * 400}],
        extra_headers={"anthropic-beta": "token-counting-2024-11-01"})
    counted = await raw.parse()
    assert counted.input_tokens == 400 // 3 + 7 and raw.headers["x-trex-upstream-provider"] == "claude"
    assert gw.mocks["alpha"].stats()["last_body"]["model"] == "claude-sonnet-4-5"
    # An openai-format route: the gateway's estimate (a token per 4 characters and overheads)
    estimated = await sdk.messages.count_tokens(model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 400}])
    assert 100 <= estimated.input_tokens < 400 // 3
    usage = (await gw.get(f"/admin/v1/accounts/{sdk.account['id']}/usage", headers=OP)).json()
    assert usage["credits"]["charged_micro"] == 0 and usage["quota"].get("requests_used", 0) == 0
    assert (await gw.head("/")).status_code == 200
    r = await gw.post("/v1/messages", content=orjson.dumps({"model": "claude-sonnet", "max_tokens": 5,
                                                            "messages": [{"role": "robot", "content": "x"}]}),
                      headers={"x-api-key": sdk.key, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("messages.0.role")


async def test_thinking_passes_through_with_its_signature_both_ways(sdk, gw):
    first = await sdk.messages.create(model="claude-sonnet", max_tokens=4096,
                                      thinking={"type": "enabled", "budget_tokens": 2048},
                                      messages=[{"role": "user", "content": "think first"}])
    thinking = first.content[0]
    assert thinking.type == "thinking" and thinking.signature.startswith("sig_")
    assert gw.mocks["alpha"].stats()["last_body"]["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    # the next turn sends the signed block back: it reaches Anthropic as it came (the mock refuses
    # an unsigned or cache-marked thinking block, as Anthropic does)
    turn = [b.model_dump() for b in first.content]
    second = await sdk.messages.create(model="claude-sonnet", max_tokens=4096,
                                       thinking={"type": "enabled", "budget_tokens": 2048},
                                       messages=[{"role": "user", "content": "think first"},
                                                 {"role": "assistant", "content": turn},
                                                 {"role": "user", "content": "and again"}])
    assert second.content[-1].type == "text"
    sent = gw.mocks["alpha"].stats()["last_body"]["messages"][1]["content"][0]
    assert sent == {"type": "thinking", "thinking": thinking.thinking, "signature": thinking.signature}
