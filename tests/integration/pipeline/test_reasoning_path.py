"""Reasoning through the whole gateway in process, to the anthropic-format mock upstream over real
HTTP (which answers with a signed thinking block when asked, and refuses what Anthropic refuses:
an unsigned thinking block, temperature with thinking, a budget not below max_tokens)."""

from __future__ import annotations

import httpx
import openai

from tests.integration.gateway import account, chat, code, new_key


async def test_chat_effort_reaches_anthropic_as_thinking_and_comes_back_signed(gw):
    key = (await new_key(gw, await account(gw)))["key"]
    r = await chat(gw, key, model="claude-sonnet", reasoning_effort="low", max_tokens=500, temperature=0.3)
    assert r.status_code == 200, r.text
    sent = gw.mocks["alpha"].stats()["last_body"]
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 2048} and sent["max_tokens"] == 2548
    message = r.json()["choices"][0]["message"]
    assert message["reasoning_content"] == "Thinking about: hello"
    block = message["thinking_blocks"][0]
    assert block["signature"].startswith("sig_")

    # The tool loop: the assistant turn goes back with its signed block, which Anthropic requires.
    history = [{"role": "user", "content": "hello"},
               {"role": "assistant", "content": message["content"], "thinking_blocks": [block]},
               {"role": "user", "content": "and then?"}]
    r = await gw.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": "claude-sonnet", "messages": history, "reasoning_effort": "low"})
    assert r.status_code == 200, r.text
    assert gw.mocks["alpha"].stats()["last_body"]["messages"][1]["content"][0] == block


async def test_an_unknown_effort_is_refused_before_any_upstream(gw):
    key = (await new_key(gw, await account(gw)))["key"]
    r = await chat(gw, key, model="claude-sonnet", reasoning_effort="extreme")
    assert (r.status_code, code(r), r.json()["error"]["param"]) == (400, "invalid_request_error", "reasoning_effort")
    assert gw.mocks["alpha"].stats()["requests"] == 0


async def test_responses_stream_through_the_sdk_carries_a_reasoning_item(gw):
    key = (await new_key(gw, await account(gw)))["key"]
    http = httpx.AsyncClient(transport=gw._transport, base_url="http://gw/v1")
    client = openai.AsyncOpenAI(api_key=key, base_url="http://gw/v1", http_client=http, max_retries=0)
    stream = await client.responses.create(model="claude-sonnet", input="why is the sky blue?", stream=True,
                                           reasoning={"effort": "medium", "summary": "auto"})
    kinds, final = [], None
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.completed":
            final = event.response
    assert "response.reasoning_summary_text.delta" in kinds
    assert final is not None and [i.type for i in final.output] == ["reasoning", "message"]
    assert final.output[0].summary[0].text.startswith("Thinking about")
    assert final.output[0].encrypted_content
    # The next turn sends the output back; the signed block reaches Anthropic again.
    follow = await client.responses.create(
        model="claude-sonnet", reasoning={"effort": "medium"},
        input=[{"role": "user", "content": "why is the sky blue?"},
               *[i.model_dump(exclude_none=True) for i in final.output],
               {"role": "user", "content": "and sunsets?"}])
    assert follow.output_text
    sent = gw.mocks["alpha"].stats()["last_body"]["messages"][1]["content"]
    assert sent[0]["type"] == "thinking" and sent[0]["signature"].startswith("sig_")
    await http.aclose()
