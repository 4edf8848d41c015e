"""Micro-benchmark of request validation on the hot path: the role-by-role message checks alone, and
the whole front step they sit in (JSON decode + top-level fields + messages), for a typical
5-message chat request and a 5-item Responses input.

    .venv/bin/python scripts/bench_validation.py            # best of 5 runs of 20,000 calls each
"""

from __future__ import annotations

import argparse
import timeit

import orjson

from trex_serve.api.input_checks import check_chat_messages, check_responses_input
from trex_serve.api.schemas import ChatCompletionRequest, ResponsesRequest, parse_model

CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
CHAT = {"model": "gpt-4o-mini", "temperature": 0.2, "messages": [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": [{"type": "text", "text": "What is the weather in Oslo?"}]},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 4, "sky": "overcast"}'},
    {"role": "user", "content": "And should I bring an umbrella?"}]}
RESPONSES = {"model": "gpt-4o-mini", "input": [
    {"role": "developer", "content": "Answer briefly."},
    {"role": "user", "content": [{"type": "input_text", "text": "What is the weather in Oslo?"}]},
    {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
    {"type": "function_call_output", "call_id": "call_1", "output": '{"temp_c": 4}'},
    {"role": "user", "content": "Umbrella?"}]}


def per_call_us(fn, number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--number", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    chat_raw, resp_raw = orjson.dumps(CHAT), orjson.dumps(RESPONSES)

    def chat_front() -> None:
        payload = orjson.loads(chat_raw)
        parse_model(ChatCompletionRequest, payload)
        check_chat_messages(payload["messages"])

    def responses_front() -> None:
        payload = orjson.loads(resp_raw)
        parse_model(ResponsesRequest, payload)
        check_responses_input(payload["input"])

    rows = [
        ("check_chat_messages, 5 messages", lambda: check_chat_messages(CHAT["messages"])),
        ("check_responses_input, 5 items", lambda: check_responses_input(RESPONSES["input"])),
        ("chat front step: orjson.loads + parse_model + messages", chat_front),
        ("responses front step: orjson.loads + parse_model + input", responses_front),
    ]
    print(f"| step | µs per call (best of {args.repeat} × {args.number:,}) |\n|---|---:|")
    for name, fn in rows:
        print(f"| {name} | {per_call_us(fn, args.number, args.repeat):.2f} |")


if __name__ == "__main__":
    main()
