"""OpenAI chat ↔ Anthropic Messages translation: requests, answers, streams and errors."""

from __future__ import annotations

import copy

import orjson
import pytest

from trex_serve.catalog import Provider
from trex_serve.providers.registry import adapter_for
from trex_serve.providers.sse import parse_usage_comment
from trex_serve.providers.usage import Usage

PROVIDER = Provider(name="claude", base_url="https://api.anthropic.com/v1/", format="anthropic")
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture
def adapter():
    return adapter_for("anthropic")


def built(adapter, body, stream=False, key="sk-ant-test"):
    call = adapter.build("chat", body, "claude-sonnet-4-5", stream, key, PROVIDER)
    return call, orjson.loads(call.body)


# ---- requests ---------------------------------------------------------------------------------


def test_build_posts_to_messages_with_anthropic_headers(adapter):
    call, body = built(adapter, {"model": "claude", "messages": [{"role": "user", "content": "hi"}]})
    assert call.url == "https://api.anthropic.com/v1/messages"
    assert call.headers["x-api-key"] == "sk-ant-test"
    assert call.headers["anthropic-version"] == "2023-06-01"
    assert call.headers["Content-Type"] == "application/json"
    assert "Authorization" not in call.headers
    assert body == {"model": "claude-sonnet-4-5", "max_tokens": 4096,
                    "messages": [{"role": "user", "content": "hi"}]}


def test_system_sampling_and_limits_are_mapped(adapter):
    src = {"model": "claude", "temperature": 1.7, "top_p": 0.9, "stop": "END", "max_completion_tokens": 300,
           "max_tokens": 10, "user": "u-1",
           "messages": [{"role": "system", "content": "Be terse."},
                        {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
                        {"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                        {"role": "user", "content": "three"}]}
    _, body = built(adapter, src, stream=True)
    assert body["system"] == "Be terse.\n\nAnswer in English."
    assert body["max_tokens"] == 300 and body["temperature"] == 1.0 and body["top_p"] == 0.9
    assert body["stop_sequences"] == ["END"] and body["stream"] is True
    assert body["metadata"] == {"user_id": "u-1"}
    assert [(m["role"], m["content"]) for m in body["messages"]] == [
        ("user", "one"), ("assistant", "two"), ("user", "three")]


def test_image_parts_become_base64_and_url_sources(adapter):
    src = {"model": "claude", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in these pictures?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]}]}
    _, body = built(adapter, src)
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "What is in these pictures?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


def test_tools_tool_calls_and_tool_results_are_mapped(adapter):
    src = {"model": "claude", "tools": [WEATHER_TOOL], "tool_choice": "required", "parallel_tool_calls": False,
           "messages": [
               {"role": "user", "content": "Weather in Paris and Rome?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "toolu_01", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                   {"id": "toolu_02", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
               {"role": "tool", "tool_call_id": "toolu_01", "content": "18C sunny"},
               {"role": "tool", "tool_call_id": "toolu_02", "content": [{"type": "text", "text": "21C"}]},
           ]}
    original = copy.deepcopy(src)
    _, body = built(adapter, src)
    assert src == original  # never mutates the caller's body
    assert body["tools"] == [{"name": "get_weather", "description": "Current weather for a city",
                              "input_schema": WEATHER_TOOL["function"]["parameters"]}]
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    user, assistant, results = body["messages"]
    assert user == {"role": "user", "content": "Weather in Paris and Rome?"}
    assert assistant == {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_02", "name": "get_weather", "input": {"city": "Rome"}}]}
    # Consecutive tool messages are one user turn of tool_result blocks (turns must alternate).
    assert results == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_01", "content": "18C sunny"},
        {"type": "tool_result", "tool_use_id": "toolu_02", "content": [{"type": "text", "text": "21C"}]}]}


@pytest.mark.parametrize("choice,expected", [
    ("auto", {"type": "auto"}),
    ("none", {"type": "none"}),
    ({"type": "function", "function": {"name": "get_weather"}}, {"type": "tool", "name": "get_weather"}),
])
def test_tool_choice_is_mapped(adapter, choice, expected):
    _, body = built(adapter, {"model": "c", "tools": [WEATHER_TOOL], "tool_choice": choice,
                              "messages": [{"role": "user", "content": "x"}]})
    assert body["tool_choice"] == expected


def test_build_is_repeatable_for_fallback(adapter):
    src = {"model": "c", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]},
                                      {"role": "user", "content": "b"}]}
    first = adapter.build("chat", src, "m", False, None, PROVIDER)
    second = adapter.build("chat", src, "m", False, None, PROVIDER)
    assert first.body == second.body and "x-api-key" not in first.headers
    assert orjson.loads(first.body)["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]


# ---- whole answers ----------------------------------------------------------------------------


def test_text_answer_becomes_chat_completion(adapter):
    raw = orjson.dumps({
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [{"type": "text", "text": "Hello! "}, {"type": "text", "text": "How can I help?"}],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 9, "cache_read_input_tokens": 100,
                  "cache_creation_input_tokens": 0}})
    body, usage = adapter.translate_response("chat", raw)
    data = orjson.loads(body)
    assert data["object"] == "chat.completion" and data["id"] == "msg_01XFDUDYJgAACzvnptvVoYEL"
    assert data["model"] == "claude-sonnet-4-5-20250929" and isinstance(data["created"], int)
    [choice] = data["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "Hello! How can I help?"
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    assert data["usage"] == {"prompt_tokens": 112, "completion_tokens": 9, "total_tokens": 121,
                             "prompt_tokens_details": {"cached_tokens": 100}}
    assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated) == (112, 9, False)


def test_tool_use_answer_becomes_tool_calls(adapter):
    raw = orjson.dumps({
        "id": "msg_02", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}}],
        "stop_reason": "tool_use", "usage": {"input_tokens": 300, "output_tokens": 40}})
    body, usage = adapter.translate_response("chat", raw)
    choice = orjson.loads(body)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    [call] = choice["message"]["tool_calls"]
    assert call["id"] == "toolu_01A" and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert orjson.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert (usage.prompt_tokens, usage.completion_tokens) == (300, 40)


@pytest.mark.parametrize("stop_reason,finish", [("max_tokens", "length"), ("stop_sequence", "stop"),
                                                ("refusal", "content_filter")])
def test_stop_reasons_map_to_finish_reasons(adapter, stop_reason, finish):
    raw = orjson.dumps({"id": "m", "type": "message", "content": [{"type": "text", "text": "x"}],
                        "stop_reason": stop_reason, "usage": {"input_tokens": 1, "output_tokens": 1}})
    assert orjson.loads(adapter.translate_response("chat", raw)[0])["choices"][0]["finish_reason"] == finish


@pytest.mark.parametrize("raw", [b'{"id": "broken", "content": [', b"[1]", b'{"type": "message"}'])
def test_malformed_answer_is_a_value_error(adapter, raw):
    with pytest.raises(ValueError):
        adapter.translate_response("chat", raw)


# ---- streams ----------------------------------------------------------------------------------


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: ".encode() + orjson.dumps(data) + b"\n\n"


STREAM = b"".join([
    sse("message_start", {"type": "message_start", "message": {
        "id": "msg_S1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 25, "output_tokens": 1}}}),
    sse("content_block_start", {"type": "content_block_start", "index": 0,
                                "content_block": {"type": "text", "text": ""}}),
    sse("ping", {"type": "ping"}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                "delta": {"type": "text_delta", "text": "Checking"}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                "delta": {"type": "text_delta", "text": " the weather."}}),
    sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
    sse("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_S1", "name": "get_weather", "input": {}}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                "delta": {"type": "input_json_delta", "partial_json": ""}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                "delta": {"type": "input_json_delta", "partial_json": '{"city": "Par'}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                "delta": {"type": "input_json_delta", "partial_json": 'is"}'}}),
    sse("content_block_stop", {"type": "content_block_stop", "index": 1}),
    sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                          "usage": {"output_tokens": 57}}),
    sse("message_stop", {"type": "message_stop"}),
])


def run_stream(adapter, raw: bytes, want_usage: bool, step: int = 7) -> tuple[bytes, object]:
    t = adapter.stream_translator("chat", want_usage, "claude-sonnet-4-5")
    out = b"".join(t.feed(raw[i:i + step]) for i in range(0, len(raw), step))  # split mid-event on purpose
    return out + t.finish(), t


def chunks(out: bytes) -> list[dict]:
    return [orjson.loads(e[6:]) for e in out.split(b"\n\n") if e.startswith(b"data: {")]


def test_stream_translates_text_and_tool_call_events(adapter):
    out, t = run_stream(adapter, STREAM, want_usage=False)
    events = [e for e in out.split(b"\n\n") if e]
    assert events[-2] == b"data: [DONE]" and events[-1].startswith(b": trex-usage")
    parsed = chunks(out)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "msg_S1" for c in parsed)
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in parsed)
    assert text == "Checking the weather."
    calls = [tc for c in parsed for tc in c["choices"][0]["delta"].get("tool_calls") or []]
    assert calls[0] == {"index": 0, "id": "toolu_S1", "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}
    assert "".join(tc["function"]["arguments"] for tc in calls) == '{"city": "Paris"}'
    assert parsed[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any("usage" in c for c in parsed)  # the client did not ask for it
    assert parse_usage_comment(out) == Usage(25, 57, False)
    assert (t.usage.prompt_tokens, t.usage.completion_tokens) == (25, 57)


def test_stream_usage_chunk_only_when_asked(adapter):
    out, _ = run_stream(adapter, STREAM, want_usage=True)
    usage_chunk = chunks(out)[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 25, "completion_tokens": 57, "total_tokens": 82}
    assert out.index(b'"usage"') < out.index(b"data: [DONE]")


def test_stream_cut_short_estimates_usage_and_sends_no_done(adapter):
    cut = STREAM[:STREAM.index(b"event: content_block_stop")]
    out, t = run_stream(adapter, cut, want_usage=True)
    assert b"[DONE]" not in out and b'"usage"' not in out
    usage = parse_usage_comment(out)
    assert usage.prompt_tokens == 25 and usage.estimated and t.usage.estimated


def test_stream_error_event_becomes_error_chunk(adapter):
    raw = STREAM[:STREAM.index(b"event: content_block_start")] + sse(
        "error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    out, _ = run_stream(adapter, raw, want_usage=False)
    errors = [c for c in chunks(out) if "error" in c]
    assert errors == [{"error": {"message": "Overloaded", "type": "upstream_error", "code": "overloaded_error"}}]
    assert b"[DONE]" not in out


def test_each_stream_gets_its_own_state(adapter):
    a = adapter.stream_translator("chat", False, "m")
    b = adapter.stream_translator("chat", False, "m")
    a.feed(STREAM)
    assert b.finish().startswith(b": trex-usage 0,0,1")


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("status,body,expected,kind", [
    (529, b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
     ("overloaded_error", "Overloaded"), "server_error"),
    (429, b'{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has '
          b'exceeded your per-minute rate limit"}}',
     ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit"), "rate_limit_error"),
    (400, b'{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: Field required"}}',
     ("invalid_request_error", "max_tokens: Field required"), "invalid_request_error"),
    (502, b"<html>Bad Gateway</html>", ("upstream_http_502", "<html>Bad Gateway</html>"), "server_error"),
    (500, b"", ("upstream_http_500", "upstream_http_500"), "server_error"),
])
def test_translate_error_reads_anthropic_envelope(adapter, status, body, expected, kind):
    err = adapter.translate_error(status, body)
    assert (err.code, err.message) == expected
    assert err.type == kind and err.param is None


def test_529_overloaded_is_retryable():
    from trex_serve.hop import contract as hop
    assert 529 in hop.RETRYABLE_STATUS


def test_build_refuses_other_apis(adapter):
    with pytest.raises(ValueError):
        adapter.build("responses", {"input": "x"}, "m", False, None, PROVIDER)
