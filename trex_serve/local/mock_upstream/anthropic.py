"""The mock upstream's Anthropic Messages answers (plain and streamed, with forced tool calls) and
errors in Anthropic's shape. Mixed into :class:`~trex_serve.local.mock_upstream.server.MockUpstream`."""

from __future__ import annotations

import asyncio
import hashlib
import random
import uuid
from typing import Any

import orjson
from aiohttp import web

ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         500: "api_error", 529: "overloaded_error"}


def _anthropic_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error")
    return web.json_response({"type": "error", "error": {"type": kind, "message": message}},
                             status=status, headers=headers or {})


def _anthropic_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for block in content:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text":
                out.append(str(block.get("text") or ""))
            elif block.get("type") == "tool_result":
                out.append(_anthropic_text(block.get("content")))
        return " ".join(out)
    return ""


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: ".encode() + orjson.dumps(data) + b"\n\n"


class AnthropicAnswers:
    """The Anthropic Messages endpoints of :class:`~trex_serve.local.mock_upstream.server.MockUpstream`, which
    provides ``name``, ``faults``, ``stats``, ``_count`` and ``_fault``."""

    # ---- Anthropic Messages -------------------------------------------------------------------

    async def messages(self, request: web.Request) -> web.StreamResponse:
        self.stats["requests"] += 1
        self.stats["last_auth"] = request.headers.get("x-api-key")
        raw = await request.read()
        self.stats["last_raw"] = raw.decode("utf-8", "replace")  # the bytes as received (pass-through tests)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self._count(400)
            return _anthropic_error(400, "bad json")
        if not isinstance(body, dict):
            self._count(400)
            return _anthropic_error(400, "body must be an object")
        self.stats["last_model"] = body.get("model")
        self.stats["last_body"] = body
        faulted = await self._fault(request, anthropic=True)
        if faulted is not None:
            return faulted
        messages = body.get("messages") or []
        if body.get("model") == "reject-me" or not isinstance(body.get("max_tokens"), int) or not messages:
            self._count(400)
            return _anthropic_error(400, "model rejected by upstream" if body.get("model") == "reject-me"
                                    else "max_tokens and messages: Field required")
        refused = _thinking_refusal(body)
        if refused:
            self._count(400)
            return _anthropic_error(400, refused)
        last = messages[-1] if isinstance(messages[-1], dict) else {}
        text = f"Hello from {self.name}! You said: {_anthropic_text(last.get('content'))[:200]}"
        system = body.get("system")
        prompt_tokens = (sum(len(_anthropic_text(m.get("content"))) for m in messages if isinstance(m, dict))
                         + len(_anthropic_text(system))) // 4 + 1
        # A forced tool choice is answered with a call of that (or the first) tool.
        tool = None
        choice = body.get("tool_choice") if isinstance(body.get("tool_choice"), dict) else {}
        if body.get("tools") and choice.get("type") in ("any", "tool"):
            tool = {"type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:12],
                    "name": choice.get("name") or body["tools"][0].get("name"),
                    "input": {"query": _anthropic_text(last.get("content"))[:100]}}
        thought = _thought(body, last)
        if body.get("stream"):
            return await self._anthropic_stream(request, body, text, prompt_tokens, tool, thought)
        if self.faults.malformed_rate and random.random() < self.faults.malformed_rate:
            self._count(200)
            return web.Response(body=b'{"id": "broken", "content": [', content_type="application/json")
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        if thought is not None:
            content.insert(0, thought)
        if tool is not None:
            content.append(tool)
        answer: dict[str, Any] = {
            "id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant",
            "model": body.get("model"), "content": content,
            "stop_reason": "tool_use" if tool else "end_turn", "stop_sequence": None,
        }
        if not self.faults.omit_usage:
            answer["usage"] = self.faults.usage or {
                "input_tokens": prompt_tokens, "output_tokens": len(text.split(" ")),
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        self._count(200)
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def count_tokens(self, request: web.Request) -> web.Response:
        """Anthropic's token count: its own arithmetic (a character in three), unlike the gateway's."""
        raw = await request.read()
        self.stats["last_raw"] = raw.decode("utf-8", "replace")
        body = orjson.loads(raw)
        self.stats["last_model"] = body.get("model")
        self.stats["last_body"] = body
        chars = sum(len(_anthropic_text(m.get("content"))) for m in body.get("messages") or [] if isinstance(m, dict))
        self._count(200)
        return web.json_response({"input_tokens": chars // 3 + len(_anthropic_text(body.get("system"))) // 3 + 7})

    async def _anthropic_stream(self, request: web.Request, body: dict, text: str, prompt_tokens: int,
                                tool: dict[str, Any] | None, thought: dict[str, Any] | None = None,
                                ) -> web.StreamResponse:
        f = self.faults
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        self._count(200)
        if f.first_byte_delay_ms:
            await asyncio.sleep(f.first_byte_delay_ms / 1000)
        words = text.split(" ")
        # As Anthropic streams it: the input side (cache classes included) in message_start, the
        # cumulative output in message_delta.
        usage = {} if f.omit_usage else {**(f.usage or {"input_tokens": prompt_tokens}), "output_tokens": 1}
        await resp.write(_sse("message_start", {"type": "message_start", "message": {
            "id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant",
            "model": body.get("model"), "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": usage}}))
        at = 0  # the text block's index: after the thinking block when there is one
        if thought is not None:
            await resp.write(_sse("content_block_start", {"type": "content_block_start", "index": 0,
                                                          "content_block": {"type": "thinking", "thinking": "",
                                                                            "signature": ""}}))
            words_t = thought["thinking"].split(" ")
            for part in (" ".join(words_t[:len(words_t) // 2]), " " + " ".join(words_t[len(words_t) // 2:])):
                await resp.write(_sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                              "delta": {"type": "thinking_delta", "thinking": part}}))
            await resp.write(_sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                "type": "signature_delta", "signature": thought["signature"]}}))
            await resp.write(_sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
            at = 1
        await resp.write(_sse("content_block_start", {"type": "content_block_start", "index": at,
                                                      "content_block": {"type": "text", "text": ""}}))
        await resp.write(_sse("ping", {"type": "ping"}))
        n = max(1, min(f.stream_chunks, len(words)))
        pieces = [" ".join(words[i * len(words) // n:(i + 1) * len(words) // n]) for i in range(n)]
        for i, piece in enumerate(pieces):
            if f.token_interval_ms:
                await asyncio.sleep(f.token_interval_ms / 1000)
            if f.reset_mid_stream and i >= 2:
                request.transport.close()  # type: ignore[union-attr]
                return resp
            await resp.write(_sse("content_block_delta", {
                "type": "content_block_delta", "index": at,
                "delta": {"type": "text_delta", "text": (" " if i else "") + piece}}))
        await resp.write(_sse("content_block_stop", {"type": "content_block_stop", "index": at}))
        if tool is not None:
            args = orjson.dumps(tool["input"]).decode()
            await resp.write(_sse("content_block_start", {"type": "content_block_start", "index": at + 1,
                                                          "content_block": {**tool, "input": {}}}))
            for part in (args[:len(args) // 2], args[len(args) // 2:]):
                await resp.write(_sse("content_block_delta", {
                    "type": "content_block_delta", "index": at + 1,
                    "delta": {"type": "input_json_delta", "partial_json": part}}))
            await resp.write(_sse("content_block_stop", {"type": "content_block_stop", "index": at + 1}))
        delta: dict[str, Any] = {"type": "message_delta",
                                 "delta": {"stop_reason": "tool_use" if tool else "end_turn",
                                           "stop_sequence": None}}
        if not f.omit_usage:
            delta["usage"] = {"output_tokens": (f.usage or {}).get("output_tokens", len(words))}
        await resp.write(_sse("message_delta", delta))
        await resp.write(_sse("message_stop", {"type": "message_stop"}))
        await resp.write_eof()
        return resp


def _thought(body: dict[str, Any], last: dict[str, Any]) -> dict[str, Any] | None:
    """A signed thinking block when the request turned thinking on, as Anthropic answers then."""
    kind = (body.get("thinking") or {}).get("type") if isinstance(body.get("thinking"), dict) else None
    if kind not in ("enabled", "adaptive"):
        return None
    thinking = f"Thinking about: {_anthropic_text(last.get('content'))[:80]}"
    return {"type": "thinking", "thinking": thinking,
            "signature": "sig_" + hashlib.sha256(thinking.encode()).hexdigest()[:32]}


def _thinking_refusal(body: dict[str, Any]) -> str | None:
    """Anthropic's own refusals of a thinking request the mock enforces, so that a mapping that breaks
    them fails in tests as it would in production."""
    thinking = body.get("thinking")
    if not isinstance(thinking, dict):
        return None
    if thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or budget < 1024:
            return "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
        if budget >= int(body.get("max_tokens") or 0):
            return "`max_tokens` must be greater than `thinking.budget_tokens`"
    if "temperature" in body and body["temperature"] != 1:
        return "`temperature` may only be set to 1 when thinking is enabled"
    for msg in body.get("messages") or []:
        for block in msg.get("content") if isinstance(msg, dict) and isinstance(msg.get("content"), list) else []:
            if isinstance(block, dict) and block.get("type") == "thinking":
                if not block.get("signature"):
                    return "messages: thinking block is missing its signature"
                if "cache_control" in block:
                    return "messages: thinking blocks cannot have cache_control"
    return None
