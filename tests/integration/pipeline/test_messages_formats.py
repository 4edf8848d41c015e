"""Anthropic's Messages API against both provider formats, with the official `anthropic` SDK and the
whole gateway in process: the pass-through's bytes, and for openai-format providers thinking (for a
candidate that takes `reasoning_effort`), cache markers (for a provider that honours them), system
blocks and a streamed tool round trip, answers in Anthropic's grammar."""

from __future__ import annotations

import anthropic
import httpx
import httpx2
import pytest
import yaml

from tests.helpers import write_catalog
from tests.integration.conftest import PLAN
from tests.integration.gateway import OP, account, new_key
from trex_serve.catalog import Catalog
from trex_serve.local.standalone import standalone_gateway
from trex_serve.settings import Settings

SYSTEM = [{"type": "text", "text": "You are Claude Code."},
          {"type": "text", "text": "Project rules.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
TOOLS = [{"name": "lookup", "description": "look it up",
          "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}}}]


@pytest.fixture
async def gwx(mocks, tmp_path, database_url, redis_url, key_prefix):
    """The integration gateway with two more routes on the openai-format mock: a provider that
    honours cache markers, and a candidate that takes reasoning_effort."""
    for m in mocks.values():
        m.reset()
    data = yaml.safe_load(write_catalog(tmp_path / "catalog.yaml", mocks, extra=PLAN).read_text())
    alpha = next(p for p in data["providers"] if p["name"] == "alpha")
    data["providers"].append({**alpha, "name": "cacher", "cache_control": True})
    data["models"] += [
        {"id": "cache-gpt", "tier": "premium",
         "price": {"input_per_mtok": 2.0, "output_per_mtok": 8.0, "cache_read_per_mtok": 0.5},
         "candidates": [{"provider": "cacher", "model": "cacher-mini"}]},
        {"id": "reasoner", "candidates": [{"provider": "alpha", "model": "alpha-reasoner", "thinking": "effort"}]}]
    settings = Settings(catalog_path="", database_url=database_url, redis_url=redis_url, admin_token="op",
                        secret_key="test-secret")
    async with standalone_gateway(settings, Catalog.model_validate(data), counters_prefix=key_prefix) as gateway:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app), base_url="http://gw") as client:
            client.runtime, client.mocks = gateway.runtime, mocks
            yield client


@pytest.fixture
async def sdk(gwx):
    acc = await account(gwx, credits=5)
    key = (await new_key(gwx, acc))["key"]
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gwx._transport.app), base_url="http://gw")
    client = anthropic.AsyncAnthropic(api_key=key, base_url="http://gw", http_client=http, max_retries=0)
    client.account, client.key, client.gw = acc, key, gwx
    yield client
    await http.aclose()


async def test_anthropic_format_provider_gets_the_client_s_bytes_except_the_model(sdk):
    gw, mock = sdk.gw, sdk.gw.mocks["alpha"]
    # as the SDK sends it
    raw = await sdk.messages.with_raw_response.create(
        model="claude-sonnet-4-5-20250929", max_tokens=1024, system=SYSTEM, metadata={"user_id": "u"},
        messages=[{"role": "user", "content": [{"type": "text", "text": "café ☕",
                                                "cache_control": {"type": "ephemeral"}}]}])
    sent = raw.http_request.content
    assert b'"claude-sonnet-4-5-20250929"' in sent
    assert mock.stats()["last_raw"].encode() == sent.replace(b'"claude-sonnet-4-5-20250929"', b'"claude-sonnet-4-5"')
    # as any client may write it: spacing, escapes, number spellings, key order and unknown fields
    # kept; the gateway's own `trex` member taken out
    body = (b'{ "messages" : [ {"role":"user","content":"caf\\u00e9 \\ud83d\\ude00"} ],\n'
            b'  "max_tokens": 1000, "temperature": 1.0E0, "model":  "claude-sonnet",\t'
            b'"trex": {"routing": {"allow_fallbacks": true}},\n  "future_field": {"x": [1, 2.50]}\n}')
    r = await gw.post("/v1/messages", content=body, headers={"x-api-key": sdk.key, "content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert mock.stats()["last_raw"].encode() == (
        b'{ "messages" : [ {"role":"user","content":"caf\\u00e9 \\ud83d\\ude00"} ],\n'
        b'  "max_tokens": 1000, "temperature": 1.0E0, "model":  "claude-sonnet-4-5",\t'
        b'"future_field": {"x": [1, 2.50]}\n}')
    # count_tokens too
    await sdk.messages.count_tokens(model="claude-sonnet", messages=[{"role": "user", "content": "x"}])
    assert '"model":"claude-sonnet-4-5"' in mock.stats()["last_raw"]


async def test_thinking_reaches_a_reasoning_model_as_an_effort_and_comes_back_as_thinking(sdk):
    mock = sdk.gw.mocks["alpha"]
    message = await sdk.messages.create(model="reasoner", max_tokens=16000,
                                        thinking={"type": "enabled", "budget_tokens": 10000},
                                        messages=[{"role": "user", "content": "think first"}])
    sent = mock.stats()["last_body"]
    assert sent["reasoning_effort"] == "medium" and sent["max_completion_tokens"] == 16000
    assert "thinking" not in sent and "max_tokens" not in sent
    assert message.content[0].type == "thinking" and message.content[0].thinking.startswith("Thinking about")
    assert message.content[1].type == "text"
    async with sdk.messages.stream(model="reasoner", max_tokens=4096, thinking={"type": "adaptive"},
                                   messages=[{"role": "user", "content": "stream"}]) as stream:
        kinds = [(e.type, getattr(getattr(e, "delta", None), "type", None)) async for e in stream]
        final = await stream.get_final_message()
    assert ("content_block_delta", "thinking_delta") in kinds and ("content_block_delta", "text_delta") in kinds
    assert mock.stats()["last_body"]["reasoning_effort"] == "high"  # adaptive, no effort named: Anthropic's default
    assert [b.type for b in final.content] == ["thinking", "text"]
    # a model that does not take reasoning_effort is served without it (never a 400 for thinking)
    plain = await sdk.messages.create(model="gpt-4o-mini", max_tokens=256, thinking={"type": "adaptive"},
                                      messages=[{"role": "user", "content": "hi"}])
    assert "reasoning_effort" not in mock.stats()["last_body"] and plain.content[0].type == "text"


async def test_cache_markers_kept_for_a_provider_that_honours_them_and_cache_reads_billed(sdk):
    gw, mock = sdk.gw, sdk.gw.mocks["alpha"]
    mock.control(usage={"prompt_tokens": 10000, "completion_tokens": 100,
                        "prompt_tokens_details": {"cached_tokens": 9000}})
    message = await sdk.messages.create(model="cache-gpt", max_tokens=256, system=SYSTEM,
                                        messages=[{"role": "user", "content": [
                                            {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}])
    system = mock.stats()["last_body"]["messages"][0]
    assert system["content"][1] == {"type": "text", "text": "Project rules.", "cache_control": {"type": "ephemeral"}}
    assert message.usage.cache_read_input_tokens == 9000 and message.usage.input_tokens == 1000
    # a provider that does not: plain strings, no marker anywhere
    await sdk.messages.create(model="gpt-4o-mini", max_tokens=256, system=SYSTEM,
                              messages=[{"role": "user", "content": "hi"}])
    assert mock.stats()["last_body"]["messages"][0] == {"role": "system",
                                                        "content": "You are Claude Code.Project rules."}
    await gw.runtime.ledger.flush_once()
    ledger = (await gw.get(f"/admin/v1/accounts/{sdk.account['id']}/ledger", headers=OP)).json()["data"]
    # cache-gpt: 1,000 uncached at 2.0 + 9,000 cache reads at 0.5 + 100 output at 8.0 per 1M
    assert -7300 in [e["amount_micro"] for e in ledger if e["kind"] == "charge"]


async def test_streamed_tool_round_trip_through_an_openai_format_provider(sdk):
    async with sdk.messages.stream(model="gpt-4o-mini", max_tokens=256, tools=TOOLS,
                                   tool_choice={"type": "tool", "name": "lookup"},
                                   messages=[{"role": "user", "content": "find trex"}]) as stream:
        kinds = [getattr(getattr(e, "delta", None), "type", None) async for e in stream]
        first = await stream.get_final_message()
    assert "input_json_delta" in kinds and first.stop_reason == "tool_use"
    call = first.content[-1]
    assert call.type == "tool_use" and call.name == "lookup" and call.input == {"query": "find trex"}
    second = await sdk.messages.create(model="gpt-4o-mini", max_tokens=256, tools=TOOLS, messages=[
        {"role": "user", "content": "find trex"},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "found it"}]}])
    assert second.stop_reason == "end_turn" and "found it" in second.content[0].text
    sent = sdk.gw.mocks["alpha"].stats()["last_body"]["messages"]
    assert sent[1]["tool_calls"][0] == {"id": call.id, "type": "function",
                                        "function": {"name": "lookup", "arguments": '{"query":"find trex"}'}}
    assert sent[2] == {"role": "tool", "tool_call_id": call.id, "content": "found it"}
