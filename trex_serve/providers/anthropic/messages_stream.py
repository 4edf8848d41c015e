"""OpenAI chat.completion.chunk SSE → Anthropic Messages stream events, as they arrive (a client
speaking Anthropic's API served by an openai-format provider): message_start, ping,
content_block_start / _delta (thinking_delta, text_delta, input_json_delta) / _stop, message_delta
with the stop reason and usage, message_stop. Reasoning comes as `reasoning_content` (vLLM, DeepSeek)
or `reasoning` (OpenRouter) text deltas, and from an OpenAI-compatible front of Anthropic (this
gateway's chat route, LiteLLM) also as finished `thinking_blocks`, whose signature becomes the
block's signature_delta. SSE comments (the `: trex-usage` settlement trailer) pass through."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from trex_serve.providers.anthropic.from_messages import STOP_REASONS
from trex_serve.providers.sse import DONE, EventSplitter, chat_event
from trex_serve.providers.usage import Usage


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"


def error_event(message: str, kind: str = "api_error") -> bytes:
    """A failure after a Messages stream began, as Anthropic reports one (the SDKs raise on it)."""
    return _event("error", {"error": {"type": kind, "message": message}})


class ChatToMessagesStream:
    def __init__(self, model: str) -> None:
        self.model = model
        self._split = EventSplitter()
        self._started = False
        self._ended = False
        self._index = -1  # the open content block's index (-1: none)
        self._open: str | None = None  # "thinking" | "text" | "tool_use"
        self._tools: dict[int, int] = {}  # chat tool_calls index → block index
        self._stop: str | None = None
        self._usage: Usage | None = None

    def _start(self) -> bytes:
        self._started = True
        message = {"id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant",
                   "model": self.model, "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": Usage().anthropic() | {"output_tokens": 0}}
        return _event("message_start", {"message": message}) + _event("ping", {})

    def _close_block(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return _event("content_block_stop", {"index": self._index})

    def _open_block(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close_block()
        self._index += 1
        self._open = kind
        return out + _event("content_block_start", {"index": self._index, "content_block": block})

    def _chunk(self, obj: dict[str, Any]) -> bytes:
        out = b"" if self._started else self._start()
        usage = Usage.from_openai(obj.get("usage"))
        if usage is not None:
            self._usage = usage
        for choice in obj.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                out += self._thinking_text(reasoning)
            for block in delta.get("thinking_blocks") or []:
                if isinstance(block, dict):
                    out += self._thinking_block(block)
            text = delta.get("content")
            if text:
                if self._open != "text":
                    out += self._open_block("text", {"type": "text", "text": ""})
                out += _event("content_block_delta", {"index": self._index,
                                                      "delta": {"type": "text_delta", "text": text}})
            for call in delta.get("tool_calls") or []:
                fn = call.get("function") or {}
                at = int(call.get("index") or 0)
                if at not in self._tools:
                    out += self._open_block("tool_use", {"type": "tool_use", "id": call.get("id") or "",
                                                         "name": fn.get("name") or "", "input": {}})
                    self._tools[at] = self._index
                if fn.get("arguments") and self._tools[at] == self._index:
                    out += _event("content_block_delta", {"index": self._index, "delta": {
                        "type": "input_json_delta", "partial_json": fn["arguments"]}})
            if choice.get("finish_reason"):
                self._stop = STOP_REASONS.get(choice["finish_reason"], "end_turn")
        return out

    def _thinking_text(self, text: str) -> bytes:
        out = b""
        if self._open != "thinking":
            out += self._open_block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        return out + _event("content_block_delta", {"index": self._index,
                                                    "delta": {"type": "thinking_delta", "thinking": text}})

    def _thinking_block(self, block: dict[str, Any]) -> bytes:
        """A finished Anthropic block: its signature ends the thinking streamed as text so far (or
        the whole block, when no text came before it); redacted thinking is a block of its own."""
        if block.get("type") == "redacted_thinking":
            return (self._open_block("redacted_thinking", {"type": "redacted_thinking",
                                                           "data": str(block.get("data") or "")})
                    + self._close_block())
        if block.get("type") != "thinking":
            return b""
        out = b""
        if self._open != "thinking" and block.get("thinking"):
            out += self._thinking_text(str(block["thinking"]))
        elif self._open != "thinking":
            out += self._open_block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        if block.get("signature"):
            out += _event("content_block_delta", {"index": self._index, "delta": {
                "type": "signature_delta", "signature": str(block["signature"])}})
        return out + self._close_block()

    def _finish_message(self) -> bytes:
        self._ended = True
        out = (b"" if self._started else self._start()) + self._close_block()
        usage = (self._usage or Usage()).anthropic()
        return (out + _event("message_delta", {"delta": {"stop_reason": self._stop or "end_turn",
                                                         "stop_sequence": None}, "usage": usage})
                + _event("message_stop", {}))

    def _handle(self, event: bytes) -> bytes:
        if event.startswith(b":"):
            return event + b"\n\n"
        obj = None if self._ended else chat_event(event)
        if obj is DONE:
            return self._finish_message()
        if not isinstance(obj, dict):
            return b""
        if isinstance(obj.get("error"), dict):
            return self.error_event(str(obj["error"].get("message") or "error"))
        return self._chunk(obj)

    def error_event(self, message: str, _code: str = "") -> bytes:
        """The stream's end on a failure (an error event from the provider, or the pool's own)."""
        self._ended = True
        return error_event(message)

    def feed(self, chunk: bytes) -> bytes:
        return b"".join(self._handle(e) for e in self._split.feed(chunk))

    def finish(self) -> bytes:
        rest = self._split.rest()
        return self._handle(rest) if rest.strip() else b""
