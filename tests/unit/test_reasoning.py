"""Reasoning through the chat and Responses routes: an effort as Anthropic thinking in the form the
model takes, thinking blocks kept whole (signatures, redacted data) to the client and back."""

from __future__ import annotations

import copy
from pathlib import Path

import orjson
import pytest

from trex_serve.api.messages import check_chat_request, check_responses_request
from trex_serve.api.responses import chat_to_response, decode_thinking, responses_to_chat
from trex_serve.api.responses_stream import ResponsesStream
from trex_serve.catalog import Provider
from trex_serve.errors import InvalidRequest
from trex_serve.providers import adapter_for

WIRE = Path(__file__).parent.parent / "fixtures" / "wire"
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
    assert blocks == [{"type": "thinking", "thinking": "The user wants the weather. I should call get_weather.",
                       "signature": SIGNATURE}]
    # the signed block arrives before any text or tool call
    first_text = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert next(i for i, d in enumerate(deltas) if d.get("thinking_blocks")) < first_text
    assert translator.usage.output_tokens == 180


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
