"""Reasoning through the chat and Responses routes: an effort as Anthropic thinking in the form the
model takes, thinking blocks kept whole (signatures, redacted data) to the client and back."""

from __future__ import annotations

import copy
from pathlib import Path

import orjson
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from trex_serve.api.input_checks import check_chat_request, check_responses_request
from trex_serve.api.responses import chat_to_response, decode_thinking, responses_to_chat
from trex_serve.api.responses_stream import ResponsesStream
from trex_serve.catalog import Provider
from trex_serve.errors import InvalidRequest
from trex_serve.providers.registry import adapter_for

WIRE = Path(__file__).parents[2] / "fixtures" / "wire"
PROVIDER = Provider(name="claude", base_url="http://upstream/v1", format="anthropic")
SIGNATURE = "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"


def built(body: dict, thinking: str | None = "budget") -> dict:
    call = adapter_for("anthropic").build("chat", body, "claude-x", False, "sk", PROVIDER, thinking=thinking)
    return orjson.loads(call.body)


def chat_body(**extra) -> dict:
    return {"model": "claude", "messages": [{"role": "user", "content": "weather in Paris?"}], **extra}


def chunks(out: bytes) -> list[dict]:
    return [orjson.loads(line[6:]) for line in out.split(b"\n") if line.startswith(b"data: {")]


# ---- the request --------------------------------------------------------------------------------


@pytest.mark.parametrize(("effort", "budget"), [("minimal", 1024), ("low", 2048), ("medium", 8192),
                                                ("high", 16384)])
def test_effort_becomes_a_thinking_budget_with_room_for_the_answer(effort, budget):
    out = built(chat_body(reasoning_effort=effort, max_tokens=1000, temperature=0.2, top_p=0.9))
    assert out["thinking"] == {"type": "enabled", "budget_tokens": budget}
    assert out["max_tokens"] == budget + 1000  # must exceed the budget
    assert "temperature" not in out and "top_p" not in out  # Anthropic refuses them with thinking


def test_a_max_tokens_above_the_budget_is_kept():
    assert built(chat_body(reasoning_effort="low", max_tokens=50000))["max_tokens"] == 50000


@pytest.mark.parametrize(("effort", "anthropic"), [("minimal", "low"), ("low", "low"), ("medium", "medium"),
                                                   ("high", "high"), ("xhigh", "max")])
def test_newer_models_take_adaptive_thinking_with_an_effort(effort, anthropic):
    out = built(chat_body(reasoning_effort=effort, max_tokens=1000), thinking="adaptive")
    assert out["thinking"] == {"type": "adaptive"} and out["output_config"] == {"effort": anthropic}
    assert out["max_tokens"] == 1000


def test_no_effort_or_none_asks_for_no_thinking():
    assert "thinking" not in built(chat_body()) and "thinking" not in built(chat_body(reasoning_effort="none"))


def test_an_unknown_effort_is_refused_naming_the_field():
    with pytest.raises(InvalidRequest) as err:
        check_chat_request(chat_body(reasoning_effort="maximum"))
    assert err.value.param == "reasoning_effort"
    with pytest.raises(InvalidRequest) as err:
        check_responses_request({"model": "m", "input": "x", "reasoning": {"effort": 3}})
    assert err.value.param == "reasoning.effort"
    check_responses_request({"model": "m", "input": "x", "reasoning": {"effort": "high", "summary": "auto"}})


# ---- the answer ---------------------------------------------------------------------------------


def test_whole_answer_keeps_thinking_signature_and_redacted_blocks():
    body, _ = adapter_for("anthropic").translate_response(
        "chat", (WIRE / "anthropic_message_thinking_tool.json").read_bytes())
    message = orjson.loads(body)["choices"][0]["message"]
    assert message["reasoning_content"] == "The user wants the weather in Paris. I should call get_weather."
    assert message["thinking_blocks"][0] == {"type": "thinking", "signature": SIGNATURE,
                                             "thinking": message["reasoning_content"]}
    assert message["thinking_blocks"][1]["type"] == "redacted_thinking"
    assert message["thinking_blocks"][1]["data"].startswith("EmwKAhgBEgy3va3")
    assert message["content"] == "Let me check the weather." and message["tool_calls"][0]["id"]


def test_stream_sends_reasoning_deltas_then_the_signed_block():
    translator = adapter_for("anthropic").stream_translator("chat", True, "claude")
    raw = (WIRE / "anthropic_stream_thinking.sse").read_bytes()
    out = b"".join(translator.feed(raw[i:i + 50]) for i in range(0, len(raw), 50)) + translator.finish()
    deltas = [c["choices"][0]["delta"] for c in chunks(out) if c.get("choices")]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == \
        "The user wants the weather. I should call get_weather."
    blocks = [b for d in deltas for b in d.get("thinking_blocks") or []]
    assert blocks == [{"index": 0, "type": "thinking",
                       "thinking": "The user wants the weather. I should call get_weather.", "signature": SIGNATURE}]
    # the signed block arrives before any text or tool call
    first_text = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert next(i for i, d in enumerate(deltas) if d.get("thinking_blocks")) < first_text
    assert translator.usage.output_tokens == 180


REDACTED = "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpPkNRj2YfWXGmKDxH4mPnZ5sQ7vB5URj"
TWO_BLOCKS = [  # a thinking block and a redacted one, then the answer, as Anthropic streams them
    {"type": "message_start", "message": {"id": "msg_01T2", "type": "message", "role": "assistant",
                                          "model": "claude-sonnet-4-5-20250929", "content": [],
                                          "stop_reason": None, "stop_sequence": None,
                                          "usage": {"input_tokens": 512, "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "",
                                                                  "signature": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Paris, so "}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "get_weather."}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": SIGNATURE}},
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "redacted_thinking", "data": REDACTED}},
    {"type": "content_block_stop", "index": 1},
    {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_01T2",
                                                                  "name": "get_weather", "input": {}}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta",
                                                          "partial_json": "{\"city\": \"Paris\"}"}},
    {"type": "content_block_stop", "index": 2},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
     "usage": {"output_tokens": 95}},
    {"type": "message_stop"},
]
SENT_BLOCKS = [{"type": "thinking", "thinking": "Paris, so get_weather.", "signature": SIGNATURE},
               {"type": "redacted_thinking", "data": REDACTED}]


def test_the_openai_sdk_stream_accumulator_keeps_several_blocks_for_the_tool_loop():
    translator = adapter_for("anthropic").stream_translator("chat", False, "claude")
    raw = b"".join(b"event: %s\ndata: %s\n\n" % (e["type"].encode(), orjson.dumps(e)) for e in TWO_BLOCKS)
    out = translator.feed(raw) + translator.finish()
    state = ChatCompletionStreamState()  # what client.chat.completions.stream() accumulates with
    for chunk in chunks(out):
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    message = state.get_final_completion().choices[0].message.model_dump(exclude_none=True)
    assert message["reasoning_content"] == "Paris, so get_weather." and len(message["thinking_blocks"]) == 2
    body = chat_body(reasoning_effort="low", messages=[
        {"role": "user", "content": "weather in Paris?"}, message,
        {"role": "tool", "tool_call_id": "toolu_01T2", "content": "18C"}])
    assert built(body)["messages"][1]["content"][:2] == SENT_BLOCKS  # the delta index stays with the client
    stream = ResponsesStream({"model": "claude"})
    events = [orjson.loads(line[6:]) for line in (stream.feed(out) + stream.finish()).split(b"\n")
              if line.startswith(b"data: ")]
    [item] = [e["item"] for e in events
              if e["type"] == "response.output_item.done" and e["item"]["type"] == "reasoning"]
    assert decode_thinking(item["encrypted_content"]) == SENT_BLOCKS


def test_tool_loop_sends_the_thinking_blocks_back_verbatim_first():
    blocks = [{"type": "thinking", "thinking": "", "signature": SIGNATURE},  # empty text, still returned
              {"type": "redacted_thinking", "data": "EmwKAhgB"}]
    body = chat_body(reasoning_effort="low", messages=[
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "", "thinking_blocks": blocks,
         "tool_calls": [{"id": "toolu_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"}])
    original = copy.deepcopy(body)
    out = built(body)
    assistant = out["messages"][1]["content"]
    assert assistant[:2] == blocks and assistant[2]["type"] == "tool_use"
    assert all("cache_control" not in b for b in assistant)
    assert body == original  # never mutated: a fallback translates it again


def test_reasoning_content_without_a_signature_is_dropped():
    body = chat_body(messages=[{"role": "user", "content": "q"},
                               {"role": "assistant", "content": "a", "reasoning_content": "unsigned"},
                               {"role": "user", "content": "more"}])
    assert built(body)["messages"][1]["content"] == "a"


def _call(call_id: str) -> dict:
    return {"id": call_id, "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}


@pytest.mark.parametrize("form", ["budget", "adaptive"])
def test_a_tool_loop_whose_turn_began_without_signed_thinking_goes_without_thinking(form):
    # Anthropic refuses thinking when the turn's first assistant message has no thinking block
    # (here: reasoning_content without a signature, which cannot be sent back): ask without.
    loop = [{"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": None, "reasoning_content": "unsigned", "tool_calls": [_call("toolu_1")]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"}]
    out = built(chat_body(reasoning_effort="high", max_tokens=1000, temperature=0.2, messages=loop), form)
    assert "thinking" not in out and "output_config" not in out
    assert (out["max_tokens"], out["temperature"]) == (1000, 0.2)  # nothing else of thinking applied either
    # A turn that began with signed thinking keeps it, though later steps of the loop carry none
    # (without interleaved thinking Claude thinks once per turn).
    signed = [loop[0], {**loop[1], "thinking_blocks": SENT_BLOCKS}, loop[2],
              {"role": "assistant", "content": None, "tool_calls": [_call("toolu_2")]},
              {"role": "tool", "tool_call_id": "toolu_2", "content": "sunny"}]
    assert "thinking" in built(chat_body(reasoning_effort="high", messages=signed), form)
    # A new question from the user starts a new turn: earlier unsigned turns do not matter.
    later = [*loop, {"role": "assistant", "content": "18C in Paris."}, {"role": "user", "content": "and Lyon?"}]
    assert "thinking" in built(chat_body(reasoning_effort="high", messages=later), form)


# ---- the Responses route ------------------------------------------------------------------------


def test_responses_answer_has_a_reasoning_item_whose_blocks_come_back_as_input():
    chat, _ = adapter_for("anthropic").translate_response(
        "chat", (WIRE / "anthropic_message_thinking_tool.json").read_bytes())
    response = chat_to_response(chat, {"model": "claude"})
    item = response["output"][0]
    assert item["type"] == "reasoning" and item["summary"][0]["text"].startswith("The user wants")
    assert decode_thinking(item["encrypted_content"])[0]["signature"] == SIGNATURE
    # the next turn sends the output back as input: the assistant turn gets its blocks again
    follow = responses_to_chat({"model": "claude", "reasoning": {"effort": "low"}, "input": [
        {"role": "user", "content": "weather?"}, *response["output"],
        {"type": "function_call_output", "call_id": "toolu_01A09q90qw90lq917835lq9", "output": "18C"}]})
    assistant = follow["messages"][1]
    assert [b["type"] for b in assistant["thinking_blocks"]] == ["thinking", "redacted_thinking"]
    assert follow["reasoning_effort"] == "low"
    out = built(follow)
    assert out["messages"][1]["content"][0]["signature"] == SIGNATURE


def test_responses_stream_emits_a_reasoning_item_before_the_message():
    translator = adapter_for("anthropic").stream_translator("chat", True, "claude")
    chat = translator.feed((WIRE / "anthropic_stream_thinking.sse").read_bytes()) + translator.finish()
    stream = ResponsesStream({"model": "claude"})
    out = stream.feed(chat) + stream.finish()
    events = [orjson.loads(line[6:]) for line in out.split(b"\n") if line.startswith(b"data: ")]
    kinds = [e["type"] for e in events]
    assert kinds.index("response.reasoning_summary_text.delta") < kinds.index("response.output_text.delta")
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done[0]["type"] == "reasoning" and decode_thinking(done[0]["encrypted_content"])[0]["signature"]
    completed = events[-1]["response"]
    assert [i["type"] for i in completed["output"]] == ["reasoning", "message", "function_call"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
