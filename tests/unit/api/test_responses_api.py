"""Responses API ↔ chat completions translation, checked against the official openai SDK's own types
and stream accumulator (the client sees exactly what the SDK parses)."""

from __future__ import annotations

import copy

import httpx
import openai
import orjson
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from trex_serve.api.responses import ResponsesInputError, chat_to_response, responses_to_chat
from trex_serve.api.responses_stream import ResponsesStream

EVENTS = TypeAdapter(ResponseStreamEvent)
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}, "strict": False}


# ---- requests ---------------------------------------------------------------------------------


def test_string_input_and_instructions_become_messages():
    body = {"model": "gpt-4o-mini", "input": "Tell me a joke", "instructions": "Be funny.",
            "max_output_tokens": 200, "temperature": 0.3, "stream": True,
            "trex": {"routing": {"provider": "alpha"}}}
    original = copy.deepcopy(body)
    chat = responses_to_chat(body)
    assert body == original
    assert chat == {"model": "gpt-4o-mini", "max_tokens": 200, "temperature": 0.3,
                    "trex": {"routing": {"provider": "alpha"}},
                    "messages": [{"role": "system", "content": "Be funny."},
                                 {"role": "user", "content": "Tell me a joke"}],
                    "stream": True, "stream_options": {"include_usage": True}}


def test_items_tools_and_function_call_round_trip():
    body = {"model": "m", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"},
            "input": [
                {"role": "user", "content": [
                    {"type": "input_text", "text": "Weather here?"},
                    {"type": "input_image", "image_url": "https://example.com/sky.jpg", "detail": "low"}]},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                 "arguments": '{"city":"Oslo"}'},
                {"type": "function_call_output", "call_id": "call_1", "output": "cold"},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Cold."}]},
                {"role": "user", "content": "thanks"},
            ]}
    chat = responses_to_chat(body)
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city", "parameters": WEATHER["parameters"],
        "strict": False}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather here?"},
                                     {"type": "image_url", "image_url": {"url": "https://example.com/sky.jpg",
                                                                         "detail": "low"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "cold"},
        {"role": "assistant", "content": "Cold."},
        {"role": "user", "content": "thanks"},
    ]


def test_json_schema_format_and_reasoning_effort_are_mapped():
    chat = responses_to_chat({"model": "m", "input": "x", "reasoning": {"effort": "low"},
                              "text": {"format": {"type": "json_schema", "name": "out", "strict": True,
                                                  "schema": {"type": "object"}}}})
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "out", "schema": {"type": "object"}, "strict": True}}
    assert chat["reasoning_effort"] == "low"


@pytest.mark.parametrize("body,param", [
    ({"model": "m", "input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    # web_search is served without (Codex always offers it); a hosted tool with no chat equivalent is refused
    ({"model": "m", "input": "x", "tools": [{"type": "web_search"}, {"type": "file_search"}]}, "tools[1]"),
    ({"model": "m", "input": [{"type": "computer_call_output", "call_id": "c"}]}, "input"),
    ({"model": "m", "input": 42}, "input"),
])
def test_unsupported_requests_raise_with_param(body, param):
    with pytest.raises(ResponsesInputError) as exc:
        responses_to_chat(body)
    assert exc.value.param == param


# ---- whole answers ----------------------------------------------------------------------------

CHAT = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini-2024",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "Why did the chicken..."}}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
                  "prompt_tokens_details": {"cached_tokens": 3}}}


def test_chat_answer_becomes_a_response_the_sdk_parses():
    request = {"model": "gpt-4o-mini", "input": "joke", "instructions": "Be funny."}
    data = chat_to_response(orjson.dumps(CHAT), request)
    resp = Response.model_validate(data)
    assert resp.id.startswith("resp_") and resp.object == "response" and resp.status == "completed"
    assert resp.model == "gpt-4o-mini-2024" and resp.instructions == "Be funny."
    assert resp.output_text == "Why did the chicken..."
    assert resp.output[0].type == "message" and resp.output[0].id.startswith("msg_")
    assert (resp.usage.input_tokens, resp.usage.output_tokens, resp.usage.total_tokens) == (11, 7, 18)
    assert resp.usage.input_tokens_details.cached_tokens == 3
    assert "output_text" not in data


def test_chat_tool_calls_become_function_call_items():
    chat = copy.deepcopy(CHAT)
    chat["choices"][0] = {"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]}}
    resp = Response.model_validate(chat_to_response(chat, {"model": "m", "tools": [WEATHER]}))
    [item] = resp.output
    assert item.type == "function_call" and item.call_id == "call_9" and item.name == "get_weather"
    assert item.arguments == '{"city":"Rome"}' and item.id.startswith("fc_")
    assert resp.tools[0].name == "get_weather" and resp.output_text == ""


def test_length_finish_is_an_incomplete_response():
    chat = copy.deepcopy(CHAT)
    chat["choices"][0]["finish_reason"] = "length"
    resp = Response.model_validate(chat_to_response(chat, {"model": "m", "max_output_tokens": 5}))
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"


# ---- streams ----------------------------------------------------------------------------------


def chunk(delta=None, finish=None, usage=None, choices=True) -> bytes:
    obj = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-4o-mini",
           "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if choices else []}
    if usage:
        obj["usage"] = usage
    return b"data: " + orjson.dumps(obj) + b"\n\n"


TEXT_STREAM = b"".join([
    chunk({"role": "assistant", "content": ""}), chunk({"content": "Hello"}), chunk({"content": ", world"}),
    chunk(finish="stop"), chunk(usage={"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
                                choices=False),
    b"data: [DONE]\n\n", b": trex-usage 5,3,0\n\n",
])

TOOL_STREAM = b"".join([
    chunk({"role": "assistant", "content": "Checking."}),
    chunk({"tool_calls": [{"index": 0, "id": "call_7", "type": "function",
                           "function": {"name": "get_weather", "arguments": ""}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
    chunk(finish="tool_calls"), b"data: [DONE]\n\n",
])


def translate(raw: bytes, request: dict, step: int = 11) -> bytes:
    s = ResponsesStream(request)
    return b"".join(s.feed(raw[i:i + step]) for i in range(0, len(raw), step)) + s.finish()


def parsed_events(out: bytes) -> list:
    events = []
    for block in out.split(b"\n\n"):
        if not block or block.startswith(b":"):
            continue
        name, data = block.split(b"\n", 1)
        payload = orjson.loads(data[len(b"data: "):])
        assert name == b"event: " + payload["type"].encode()
        events.append(EVENTS.validate_python(payload))
    return events


def test_text_stream_becomes_typed_events_in_order():
    out = translate(TEXT_STREAM, {"model": "gpt-4o-mini", "input": "hi", "stream": True})
    events = parsed_events(out)
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello, world"
    done = events[-1].response
    assert done.status == "completed" and done.output_text == "Hello, world"
    assert (done.usage.input_tokens, done.usage.output_tokens) == (5, 3)
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1
    assert out.endswith(b": trex-usage 5,3,0\n\n")  # the settlement trailer survives


def test_tool_stream_gives_function_call_items():
    events = parsed_events(translate(TOOL_STREAM, {"model": "m", "input": "w", "tools": [WEATHER]}))
    types = [e.type for e in events]
    assert types.index("response.output_item.done") < types.index("response.function_call_arguments.delta")
    final = events[-1].response
    message, call = final.output
    assert message.type == "message" and final.output_text == "Checking."
    assert call.type == "function_call" and call.call_id == "call_7" and call.arguments == '{"city":"Paris"}'
    assert [e.output_index for e in events if e.type == "response.function_call_arguments.delta"] == [1, 1]


def test_interrupted_stream_ends_with_error_and_failed():
    raw = TEXT_STREAM[:TEXT_STREAM.index(b"data: [DONE]")].replace(
        chunk(finish="stop"), b'data: {"error": {"message": "alpha stream interrupted", '
                              b'"type": "upstream_error", "code": "upstream_stream_interrupted"}}\n\n')
    events = parsed_events(translate(raw, {"model": "m", "input": "x"}))
    assert [e.type for e in events][-2:] == ["error", "response.failed"]
    assert events[-1].response.status == "failed" and events[-1].response.error.code == "server_error"
    assert events[-1].response.output_text == "Hello, world"


def test_stream_that_just_stops_is_failed_not_completed():
    events = parsed_events(translate(TEXT_STREAM[:200], {"model": "m", "input": "x"}))
    assert events[-1].type == "response.failed"


def sdk_client(body: bytes, content_type: str) -> openai.OpenAI:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": content_type})
    return openai.OpenAI(api_key="trex-test", base_url="http://gw/v1",
                         http_client=httpx.Client(transport=httpx.MockTransport(handler)))


def test_official_sdk_stream_helper_accumulates_our_events():
    request = {"model": "m", "input": "w", "tools": [WEATHER]}
    client = sdk_client(translate(TOOL_STREAM, request), "text/event-stream")
    with client.responses.stream(model="m", input="w", tools=[WEATHER]) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas == ["Checking."]
    assert final.output_text == "Checking." and final.output[1].arguments == '{"city":"Paris"}'


def test_official_sdk_reads_a_whole_response():
    client = sdk_client(orjson.dumps(chat_to_response(CHAT, {"model": "gpt-4o-mini"})), "application/json")
    resp = client.responses.create(model="gpt-4o-mini", input="joke")
    assert resp.output_text == "Why did the chicken..." and resp.usage.total_tokens == 18
