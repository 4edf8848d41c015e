"""Anthropic Messages ↔ OpenAI chat for a Messages client served by an openai-format provider
(providers/anthropic/from_messages.py and messages_stream.py): requests, whole answers and streams,
thinking included, on realistic payloads."""

from __future__ import annotations

import copy

import orjson
import pytest

from trex_serve.catalog import Catalog
from trex_serve.providers.anthropic.from_messages import chat_to_message, messages_to_chat
from trex_serve.providers.anthropic.messages_stream import ChatToMessagesStream
from trex_serve.providers.openai_chat import MessagesStream

TOOLS = [{"name": "Read", "description": "read a file",
          "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
          "cache_control": {"type": "ephemeral"}},
         {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]
CLAUDE_CODE = {
    "model": "claude-sonnet-4-5-20250929", "max_tokens": 64000, "stream": True,
    "system": [{"type": "text", "text": "You are Claude Code."},
               {"type": "text", "text": "Project rules.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "read a.py", "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should read it.", "signature": "sig_1"},
            {"type": "text", "text": "Reading."},
            {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"path": "a.py"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "no such file"}],
             "is_error": True},
            {"type": "text", "text": "try b.py"}]},
    ],
    "tools": TOOLS, "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
    "metadata": {"user_id": "user_abc"}, "thinking": {"type": "enabled", "budget_tokens": 10000},
    "context_management": {"edits": []}, "temperature": 1,
}


def test_claude_code_request_becomes_chat_and_the_body_is_not_touched():
    before = copy.deepcopy(CLAUDE_CODE)
    chat = messages_to_chat(CLAUDE_CODE)
    assert CLAUDE_CODE == before  # a fallback translates the same body again
    assert chat["messages"][0] == {"role": "system", "content": "You are Claude Code.Project rules."}
    assert chat["messages"][1] == {"role": "user", "content": "read a.py"}
    assert chat["messages"][2] == {"role": "assistant", "content": "Reading.", "tool_calls": [
        {"id": "toolu_1", "type": "function", "function": {"name": "Read", "arguments": '{"path":"a.py"}'}}]}
    assert chat["messages"][3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: no such file"}
    assert chat["messages"][4] == {"role": "user", "content": "try b.py"}
    # the server tool has no chat form; tool_choice and parallelism kept; thinking dropped by default
    assert [t["function"]["name"] for t in chat["tools"]] == ["Read"]
    assert chat["tool_choice"] == "auto" and chat["parallel_tool_calls"] is False
    assert chat["user"] == "user_abc" and chat["max_tokens"] == 64000 and chat["temperature"] == 1
    assert chat["stream_options"] == {"include_usage": True}
    assert "reasoning_effort" not in chat and "context_management" not in chat


def test_cache_markers_are_kept_without_ttl_for_a_provider_that_honours_them():
    chat = messages_to_chat(CLAUDE_CODE, keep_cache=True)
    assert chat["messages"][0]["content"] == [
        {"type": "text", "text": "You are Claude Code."},
        {"type": "text", "text": "Project rules.", "cache_control": {"type": "ephemeral"}}]
    assert chat["messages"][1]["content"] == [{"type": "text", "text": "read a.py",
                                               "cache_control": {"type": "ephemeral"}}]
    # never a marker on something Anthropic's schema gives none: the assistant's text, tool calls
    assert "cache_control" not in orjson.dumps(chat["messages"][2]).decode()


@pytest.mark.parametrize(("thinking", "config", "effort"), [
    ({"type": "enabled", "budget_tokens": 1024}, None, "minimal"),
    ({"type": "enabled", "budget_tokens": 10000}, None, "medium"),
    ({"type": "enabled", "budget_tokens": 64000}, None, "xhigh"),
    ({"type": "adaptive"}, None, "high"),
    ({"type": "adaptive"}, {"effort": "max"}, "xhigh"),
    ({"type": "adaptive"}, {"effort": "low"}, "low"),
    ({"type": "disabled"}, None, None),
])
def test_thinking_becomes_reasoning_effort_only_for_a_model_that_takes_it(thinking, config, effort):
    body = {**CLAUDE_CODE, "thinking": thinking, **({"output_config": config} if config else {})}
    chat = messages_to_chat(body, effort=True)
    assert chat.get("reasoning_effort") == effort
    if effort:  # reasoning models take max_completion_tokens (it counts the reasoning, as max_tokens does)
        assert chat["max_completion_tokens"] == 64000 and "max_tokens" not in chat
    assert "reasoning_effort" not in messages_to_chat(body)


def test_whole_chat_answer_becomes_a_message_with_reasoning_tools_and_cache_usage():
    call = {"id": "call_1", "type": "function", "function": {"name": "Read", "arguments": '{"path": "b.py"}'}}
    said = {"role": "assistant", "content": "Let me look.", "reasoning_content": "the user wants a file",
            "tool_calls": [call]}
    chat = {"id": "chatcmpl-1", "model": "up-model",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": said}],
            "usage": {"prompt_tokens": 1200, "completion_tokens": 40, "prompt_tokens_details": {"cached_tokens": 1000}}}
    message, usage = chat_to_message(chat, "up-model")
    assert [b["type"] for b in message["content"]] == ["thinking", "text", "tool_use"]
    assert message["content"][0] == {"type": "thinking", "thinking": "the user wants a file", "signature": ""}
    assert message["content"][2] == {"type": "tool_use", "id": "call_1", "name": "Read", "input": {"path": "b.py"}}
    assert message["stop_reason"] == "tool_use" and message["model"] == "up-model"
    assert message["usage"]["input_tokens"] == 200 and message["usage"]["cache_read_input_tokens"] == 1000
    assert usage is not None and usage.cache_read_tokens == 1000


def test_an_anthropic_front_s_signed_blocks_come_back_as_they_were():
    blocks = [{"type": "thinking", "thinking": "hmm", "signature": "sig_x"},
              {"type": "redacted_thinking", "data": "ZZ"}]
    chat = {"choices": [{"finish_reason": "length", "message": {"content": "partial", "reasoning_content": "hmm",
                                                                "thinking_blocks": blocks}}]}
    message, _ = chat_to_message(chat, "m")
    assert message["content"][:2] == blocks and message["stop_reason"] == "max_tokens"


def _events(raw: bytes) -> list[dict]:
    return [orjson.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: ")]


def _chunk(delta: dict, finish: str | None = None, **extra) -> bytes:
    return b"data: " + orjson.dumps({"object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": delta, "finish_reason": finish}], **extra}) + b"\n\n"


def test_stream_translates_event_by_event_in_anthropic_s_grammar():
    stream = MessagesStream("up-model")
    first = stream.feed(_chunk({"role": "assistant", "content": ""}) + _chunk({"reasoning_content": "think "}))
    kinds = [e["type"] for e in _events(first)]
    # nothing buffered: the thinking delta leaves with the chunk that carried it
    assert kinds == ["message_start", "ping", "content_block_start", "content_block_delta"]
    assert _events(first)[3]["delta"] == {"type": "thinking_delta", "thinking": "think "}
    out = first + stream.feed(_chunk({"content": "Hello"}) + _chunk({"tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "Read", "arguments": ""}}]})
        + _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"path":'}}]})
        + _chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "a"}'}}]})
        + _chunk({}, "tool_calls")
        + b"data: " + orjson.dumps({"choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": 9}}) + b"\n\n"
        + b"data: [DONE]\n\n")
    out += stream.finish()
    events = _events(out)
    starts = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    assert starts == ["thinking", "text", "tool_use"]
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
    assert [d["type"] for d in deltas] == ["thinking_delta", "text_delta", "input_json_delta", "input_json_delta"]
    assert "".join(d.get("partial_json", "") for d in deltas) == '{"path": "a"}'
    assert [e["index"] for e in events if e["type"] == "content_block_stop"] == [0, 1, 2]
    end = [e for e in events if e["type"] == "message_delta"][0]
    assert end["delta"]["stop_reason"] == "tool_use" and end["usage"]["output_tokens"] == 9
    assert events[-1]["type"] == "message_stop"
    assert b": trex-usage " in out and stream.usage is not None and stream.usage.prompt_tokens == 50


def test_stream_signature_of_an_anthropic_front_ends_the_thinking_block():
    stream = ChatToMessagesStream("m")
    out = stream.feed(_chunk({"reasoning_content": "a"}) + _chunk({"thinking_blocks": [
        {"type": "thinking", "thinking": "a", "signature": "sig_9", "index": 0}]}) + _chunk({"thinking_blocks": [
            {"type": "redacted_thinking", "data": "QQ", "index": 1}]}) + _chunk({"content": "ok"}, "stop")
        + b"data: [DONE]\n\n")
    events = _events(out)
    assert [e["type"] for e in events][2:6] == ["content_block_start", "content_block_delta", "content_block_delta",
                                                "content_block_stop"]
    assert events[4]["delta"] == {"type": "signature_delta", "signature": "sig_9"}
    assert events[6]["content_block"] == {"type": "redacted_thinking", "data": "QQ"}
    assert [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"] == [
        "thinking", "redacted_thinking", "text"]


def test_a_failure_mid_stream_is_an_anthropic_error_event():
    stream = MessagesStream("m")
    out = stream.feed(_chunk({"content": "par"}))
    out += stream.error_event("alpha stream interrupted", "upstream_stream_interrupted") + stream.finish()
    events = _events(out)
    assert events[-1] == {"type": "error", "error": {"type": "api_error", "message": "alpha stream interrupted"}}
    assert b"event: error\n" in out and "message_stop" not in [e["type"] for e in events]


def test_the_catalog_takes_effort_only_on_an_openai_format_candidate():
    def catalog(fmt: str) -> Catalog:
        return Catalog.model_validate({
            "providers": [{"name": "p", "base_url": "http://127.0.0.1:1", "format": fmt}],
            "models": [{"id": "m", "candidates": [{"provider": "p", "model": "up", "thinking": "effort"}]}]})

    assert catalog("openai").model("m").candidates[0].thinking == "effort"
    with pytest.raises(ValueError, match=r"models\.0\.candidates\.0\.thinking"):
        catalog("anthropic")
