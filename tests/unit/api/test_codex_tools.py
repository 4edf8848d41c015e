"""Codex's Responses requests served by a chat-only provider: namespace tools flattened into their
functions and the calls mapped back, hosted tools it always offers (web_search) served without,
other hosted tools refused by name."""

from __future__ import annotations

import orjson
import pytest

from trex_serve.api.responses import ResponsesInputError, chat_to_response, responses_to_chat
from trex_serve.api.responses_stream import ResponsesStream

NS = {"type": "namespace", "name": "multi_agent_v1", "description": "sub-agents", "tools": [
    {"type": "function", "name": "spawn_agent", "strict": False,
     "parameters": {"type": "object", "properties": {"task": {"type": "string"}}}},
    {"type": "function", "name": "close_agent", "parameters": {"type": "object", "properties": {}}}]}
REQUEST = {"model": "gpt-4o-mini", "store": False, "include": ["reasoning.encrypted_content"],
           "reasoning": {"summary": "auto"}, "prompt_cache_key": "k", "parallel_tool_calls": True,
           "tools": [{"type": "function", "name": "exec_command", "parameters": {"type": "object"}}, NS,
                     {"type": "web_search"}],
           "input": [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "rules"}]},
                     {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "go"}]}]}


def test_namespace_functions_are_flattened_and_web_search_left_out():
    chat = responses_to_chat(REQUEST)
    assert [t["function"]["name"] for t in chat["tools"]] == [
        "exec_command", "multi_agent_v1__spawn_agent", "multi_agent_v1__close_agent"]
    assert chat["messages"][0] == {"role": "developer", "content": "rules"}


def test_other_hosted_tools_are_refused_naming_the_tool():
    with pytest.raises(ResponsesInputError) as err:
        responses_to_chat({**REQUEST, "tools": [*REQUEST["tools"], {"type": "code_interpreter"}]})
    assert err.value.param == "tools[3]" and "code_interpreter" in str(err.value)


def test_a_call_of_a_namespaced_function_comes_back_with_its_namespace():
    chat = {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "multi_agent_v1__spawn_agent", "arguments": "{\"task\": \"x\"}"}}]},
        "finish_reason": "tool_calls"}]}
    item = chat_to_response(chat, REQUEST)["output"][0]
    assert (item["name"], item["namespace"], item["call_id"]) == ("spawn_agent", "multi_agent_v1", "call_1")
    # the client sends it back as input next turn: the provider sees the flattened name again
    follow = responses_to_chat({**REQUEST, "input": [*REQUEST["input"], item,
                                                     {"type": "function_call_output", "call_id": "call_1",
                                                      "output": "spawned"}]})
    assert follow["messages"][2]["tool_calls"][0]["function"]["name"] == "multi_agent_v1__spawn_agent"


def test_a_function_whose_name_merely_contains_the_separator_is_left_alone():
    chat = {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get__weather", "arguments": "{}"}}]}}]}
    item = chat_to_response(chat, REQUEST)["output"][0]
    assert item["name"] == "get__weather" and "namespace" not in item


def test_stream_output_items_carry_the_namespace():
    chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call_9", "type": "function",
         "function": {"name": "multi_agent_v1__close_agent", "arguments": "{}"}}]}, "finish_reason": "tool_calls"}]}
    stream = ResponsesStream(REQUEST)
    out = stream.feed(b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n") + stream.finish()
    events = [orjson.loads(line[6:]) for line in out.split(b"\n") if line.startswith(b"data: ")]
    added = [e["item"] for e in events if e["type"] == "response.output_item.added"]
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert added[0]["namespace"] == done[0]["namespace"] == "multi_agent_v1"
    assert done[0]["name"] == "close_agent"
