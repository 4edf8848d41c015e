"""Codex's `/v1/responses` requests through the whole gateway: its fields accepted, hosted tools
passed natively to a provider that serves the Responses API and refused by name only where no
translation exists, `output_item` events on every path."""

from __future__ import annotations

import orjson

from tests.integration.gateway import account, new_key

NAMESPACE = {"type": "namespace", "name": "multi_agent_v1", "description": "sub-agents", "tools": [
    {"type": "function", "name": "spawn_agent", "parameters": {"type": "object", "properties": {}}}]}


def codex_body(model: str, tools: list) -> dict:
    return {"model": model, "stream": True, "store": False, "reasoning": {"summary": "auto"},
            "include": ["reasoning.encrypted_content"], "prompt_cache_key": "k1", "parallel_tool_calls": False,
            "instructions": "You are Codex.", "tools": tools,
            "input": [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "rules"}]},
                      {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "say hello"}]}]}


async def stream_events(gw, key: str, body: dict) -> tuple[int, list[dict]]:
    async with gw.stream("POST", "/v1/responses", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        raw = b"".join([chunk async for chunk in r.aiter_bytes()])
    if r.status_code != 200:
        return r.status_code, [orjson.loads(raw)]
    return 200, [orjson.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: {")]


async def test_codex_on_a_chat_only_provider_and_on_a_native_one(gw):
    key = (await new_key(gw, await account(gw, credits=5)))["key"]
    tools = [{"type": "function", "name": "shell", "parameters": {"type": "object"}}, NAMESPACE,
             {"type": "web_search"}]
    for model, mock in (("gpt-4o-mini", "alpha"), ("native-model", "beta")):
        status, events = await stream_events(gw, key, codex_body(model, tools))
        kinds = [e["type"] for e in events]
        assert status == 200 and kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
        assert "response.output_item.added" in kinds and "response.output_item.done" in kinds
        done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
        assert done[0]["type"] == "message" and "Hello from" in done[0]["content"][0]["text"]
        sent = gw.mocks[mock].stats()["last_body"]
        if mock == "alpha":  # chat: the namespace flattened, web_search served without
            assert [t["function"]["name"] for t in sent["tools"]] == ["shell", "multi_agent_v1__spawn_agent"]
        else:  # native: every tool as Codex sent it
            assert sent["tools"] == tools and sent["store"] is False


async def test_hosted_tools_go_natively_and_are_refused_by_name_only_without_a_translation(gw):
    key = (await new_key(gw, await account(gw, credits=5)))["key"]
    tools = [{"type": "function", "name": "shell", "parameters": {"type": "object"}},
             {"type": "code_interpreter", "container": {"type": "auto"}}]
    status, events = await stream_events(gw, key, codex_body("native-model", tools))
    assert status == 200 and events[-1]["type"] == "response.completed"
    assert gw.mocks["beta"].stats()["last_body"]["tools"][1]["type"] == "code_interpreter"
    r = await gw.post("/v1/responses", json={**codex_body("gpt-4o-mini", tools), "stream": False},
                      headers={"Authorization": f"Bearer {key}"})
    err = r.json()["error"]
    assert (r.status_code, err["code"], err["param"]) == (400, "invalid_request_error", "tools[1]")
    assert "code_interpreter" in err["message"] and r.headers["x-trex-attempts"] == "0"
