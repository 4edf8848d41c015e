"""Anthropic Messages SSE events → OpenAI chat.completion.chunk events, with usage while streaming.

One `AnthropicStream` per answer: it keeps the message id, the tool-call indexes and the running
token counts, and on `finish` reports the usage (estimated when the stream was cut short)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import orjson

from trex_serve.providers.anthropic.mapping import finish_reason
from trex_serve.providers.base import Usage
from trex_serve.providers.sse import EventSplitter, data_of, usage_comment
from trex_serve.providers.usage import CHARS_PER_TOKEN


class AnthropicStream:
    """Anthropic message events in, chat.completion.chunk events out (one translator per stream)."""

    def __init__(self, want_usage: bool, model: str) -> None:
        self.want_usage = want_usage
        self.usage: Usage | None = None
        self.delivered_chars = 0
        self._split = EventSplitter()
        self._id = "msg"
        self._model = model
        self._created = int(time.time())
        self._usage: dict[str, Any] = {}  # Anthropic's usage fields as last reported (cumulative)
        self._final_usage = False
        self._tools: dict[int, int] = {}  # Anthropic block index → OpenAI tool_calls index
        self._thinking: dict[int, dict[str, str]] = {}  # open thinking blocks: text and signature so far
        self._blocks_sent = 0  # thinking blocks delivered: the next one's place in thinking_blocks
        self._done = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        obj = {"id": self._id, "object": "chat.completion.chunk", "created": self._created,
               "model": self._model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                  "logprobs": None}]}
        return b"data: " + orjson.dumps(obj)

    def _block(self, block: dict[str, str]) -> bytes:
        # Each block carries its place in the message's thinking_blocks, as tool_calls deltas do: the
        # OpenAI SDK's stream accumulator refuses a second list entry without an index.
        self._blocks_sent += 1
        return self._chunk({"thinking_blocks": [{"index": self._blocks_sent - 1, **block}]})

    def _take_usage(self, usage: Any) -> None:
        # message_start carries the input side; message_delta the cumulative output (and, from
        # newer API versions, the input side again): the latest value of each field wins.
        if isinstance(usage, dict):
            self._usage.update({k: v for k, v in usage.items() if v is not None})

    def _current(self) -> Usage:
        return Usage.from_anthropic(self._usage) or Usage()

    def _event(self, event: bytes) -> bytes | None:
        data = data_of(event)
        if not data:
            return None
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict):
            return None
        kind = obj.get("type")
        if kind == "message_start":
            msg = obj.get("message") or {}
            self._id = str(msg.get("id") or self._id)
            self._model = msg.get("model") or self._model
            self._take_usage(msg.get("usage"))
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start":
            block = obj.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = self._tools.setdefault(int(obj.get("index") or 0), len(self._tools))
                self.delivered_chars += len(block.get("name") or "")
                return self._chunk({"tool_calls": [{"index": index, "id": block.get("id") or "",
                                                    "type": "function",
                                                    "function": {"name": block.get("name") or "",
                                                                 "arguments": ""}}]})
            if block.get("type") == "text" and block.get("text"):
                self.delivered_chars += len(block["text"])
                return self._chunk({"content": block["text"]})
            if block.get("type") == "thinking":
                text = str(block.get("thinking") or "")
                self._thinking[int(obj.get("index") or 0)] = {"type": "thinking", "thinking": text,
                                                              "signature": str(block.get("signature") or "")}
                self.delivered_chars += len(text)
                return self._chunk({"reasoning_content": text}) if text else None
            if block.get("type") == "redacted_thinking":  # opaque: passed on as it came, whole
                return self._block({"type": "redacted_thinking", "data": str(block.get("data") or "")})
            return None
        if kind == "content_block_delta":
            delta = obj.get("delta") or {}
            if delta.get("type") == "text_delta":
                text = str(delta.get("text") or "")
                self.delivered_chars += len(text)
                return self._chunk({"content": text}) if text else None
            if delta.get("type") == "input_json_delta":
                index = self._tools.get(int(obj.get("index") or 0))
                part = str(delta.get("partial_json") or "")
                if index is None or not part:
                    return None
                self.delivered_chars += len(part)
                return self._chunk({"tool_calls": [{"index": index, "function": {"arguments": part}}]})
            open_block = self._thinking.get(int(obj.get("index") or 0))
            if open_block is not None and delta.get("type") == "thinking_delta":
                text = str(delta.get("thinking") or "")
                open_block["thinking"] += text
                self.delivered_chars += len(text)
                return self._chunk({"reasoning_content": text}) if text else None
            if open_block is not None and delta.get("type") == "signature_delta":
                open_block["signature"] += str(delta.get("signature") or "")
            return None
        if kind == "content_block_stop":
            # A finished thinking block goes to the client whole, with its signature, so that it can
            # send it back in a tool loop.
            done = self._thinking.pop(int(obj.get("index") or 0), None)
            return self._block(done) if done is not None else None
        if kind == "message_delta":
            self._take_usage(obj.get("usage"))
            self._final_usage = self._final_usage or isinstance((obj.get("usage") or {}).get("output_tokens"), int)
            reason = finish_reason((obj.get("delta") or {}).get("stop_reason"))
            return self._chunk({}, reason) if reason else None
        if kind == "message_stop":
            self._done = True
            out = []
            if self.want_usage and (self._final_usage or self._usage):
                usage = {"id": self._id, "object": "chat.completion.chunk", "created": self._created,
                         "model": self._model, "choices": [], "usage": self._current().openai_chat()}
                out.append(b"data: " + orjson.dumps(usage))
            out.append(b"data: [DONE]")
            return b"\n\n".join(out)
        if kind == "error":
            err = obj.get("error") or {}
            code = str(err.get("type") or "upstream_error")
            body = {"error": {"message": str(err.get("message") or code), "type": "upstream_error",
                              "code": code}}
            return b"data: " + orjson.dumps(body)
        return None  # ping, unknown future events

    def feed(self, chunk: bytes) -> bytes:
        out = [e for e in (self._event(ev) for ev in self._split.feed(chunk)) if e]
        return b"\n\n".join(out) + b"\n\n" if out else b""

    def finish(self) -> bytes:
        rest = self._split.rest()
        tail = self._event(rest) if rest.strip() else None
        head = tail + b"\n\n" if tail else b""
        seen = self._current()
        if self._final_usage:
            self.usage = seen
        else:  # cut short: what we saw of the prompt, and an estimate of what was delivered
            self.usage = replace(seen, output_tokens=max(seen.output_tokens,
                                                         self.delivered_chars // CHARS_PER_TOKEN), estimated=True)
        return head + usage_comment(self.usage)
