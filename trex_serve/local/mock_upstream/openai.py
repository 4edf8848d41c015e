"""The mock upstream's OpenAI-shaped answers: chat completions (plain, streamed, giant, endless),
native Responses and the model list. Mixed into :class:`~trex_serve.local.mock_upstream.server.MockUpstream`."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any

import orjson
from aiohttp import web


def _forced_call(body: dict[str, Any], last: Any) -> dict[str, Any] | None:
    """A forced tool choice is answered with a call of that (or the first) tool, as OpenAI does."""
    choice = body.get("tool_choice")
    if not (body.get("tools") and (choice == "required" or isinstance(choice, dict))):
        return None
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    name = name or (body["tools"][0].get("function") or {}).get("name") or "tool"
    return {"id": "call_" + uuid.uuid4().hex[:12], "type": "function",
            "function": {"name": name, "arguments": orjson.dumps({"query": str(last)[:100]}).decode()}}


def _reasoning(body: dict[str, Any], last: Any) -> str:
    """The reasoning text a reasoning model (vLLM, DeepSeek) answers with when asked for an effort."""
    effort = body.get("reasoning_effort")
    return f"Thinking about: {str(last or '')[:80]}" if isinstance(effort, str) and effort != "none" else ""


class OpenAIAnswers:
    """The OpenAI-shaped endpoints of :class:`~trex_serve.local.mock_upstream.server.MockUpstream`, which
    provides ``name``, ``faults``, ``stats``, ``_count`` and ``_fault``."""

    # ---- OpenAI chat completions and models ---------------------------------------------------

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "mock-model", "object": "model",
                                                              "created": 0, "owned_by": self.name}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.stats["requests"] += 1
        self.stats["last_auth"] = request.headers.get("Authorization")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            self._count(400)
            return web.json_response({"error": {"message": "bad json", "type": "invalid_request_error",
                                                "code": "invalid_json"}}, status=400)
        self.stats["last_model"] = body.get("model")
        self.stats["last_body"] = body
        faulted = await self._fault(request)
        if faulted is not None:
            return faulted
        if body.get("model") == "reject-me":
            self._count(400)
            return web.json_response({"error": {"message": "model rejected by upstream", "param": "model",
                                                "type": "invalid_request_error", "code": "model_rejected"}},
                                     status=400)
        messages = body.get("messages") or []
        last = next((m.get("content") for m in reversed(messages) if isinstance(m, dict)), "") or ""
        text = f"Hello from {self.name}! You said: {str(last)[:200]}"
        prompt_tokens = sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict)) // 4 + 1
        if body.get("stream"):
            return await self._stream(request, body, text, prompt_tokens)
        if self.faults.malformed_rate and random.random() < self.faults.malformed_rate:
            self._count(200)
            return web.Response(body=b'{"id": "broken", "choices": [', content_type="application/json")
        if self.faults.giant_body_bytes:
            return await self._giant(request, body, self.faults.giant_body_bytes)
        words = text.split(" ")
        answer: dict[str, Any] = {
            "id": "chatcmpl-" + uuid.uuid4().hex[:12], "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop", "logprobs": None}],
        }
        call = _forced_call(body, last)
        if call is not None:
            answer["choices"][0].update(message={"role": "assistant", "content": None, "tool_calls": [call]},
                                        finish_reason="tool_calls")
        if _reasoning(body, last):
            answer["choices"][0]["message"]["reasoning_content"] = _reasoning(body, last)
        if not self.faults.omit_usage:
            answer["usage"] = self.faults.usage or {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                               "total_tokens": prompt_tokens + len(words)}
        self._count(200)
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def _giant(self, request: web.Request, body: dict, size: int) -> web.StreamResponse:
        """A well-formed answer whose content is ``size`` bytes, written in 64 KiB pieces (the mock
        itself never holds it whole)."""
        self._count(200)
        head = orjson.dumps({"id": "chatcmpl-giant", "object": "chat.completion", "created": int(time.time()),
                             "model": body.get("model")})[:-1] + b',"choices":[{"index":0,"message":' \
            b'{"role":"assistant","content":"'
        tail = b'"},"finish_reason":"stop"}]}'
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        try:
            await resp.write(head)
            piece = b"x" * 65536
            for _ in range(size // len(piece) + 1):
                await resp.write(piece)
            await resp.write(tail)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return resp

    async def _endless(self, request: web.Request, resp: web.StreamResponse, base: dict) -> web.StreamResponse:
        f = self.faults
        chunk = b"data: " + orjson.dumps({**base, "choices": [{"index": 0, "delta": {"content": " more"},
                                                               "finish_reason": None}]}) + b"\n\n"
        try:
            while True:
                await resp.write(chunk)
                await asyncio.sleep(f.token_interval_ms / 1000 if f.token_interval_ms else 0)
        except (ConnectionError, RuntimeError):
            return resp

    async def _stream(self, request: web.Request, body: dict, text: str, prompt_tokens: int) -> web.StreamResponse:
        f = self.faults
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        self._count(200)
        if f.first_byte_delay_ms:
            await asyncio.sleep(f.first_byte_delay_ms / 1000)
        cid = "chatcmpl-" + uuid.uuid4().hex[:12]
        base = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body.get("model")}
        words = text.split(" ")
        n = max(1, min(f.stream_chunks, len(words)))
        pieces = [" ".join(words[i * len(words) // n:(i + 1) * len(words) // n]) for i in range(n)]
        first = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                      "finish_reason": None}]}
        await resp.write(b"data: " + orjson.dumps(first) + b"\n\n")
        last = next((m.get("content") for m in reversed(body.get("messages") or []) if isinstance(m, dict)), "")
        thought = _reasoning(body, last)
        for part in thought.split(" ") if thought else ():
            delta = {"reasoning_content": part + " "}
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        if f.endless_stream:
            return await self._endless(request, resp, base)
        if f.giant_sse_line_bytes:
            try:
                await resp.write(b"data: ")
                for _ in range(f.giant_sse_line_bytes // 65536 + 1):
                    await resp.write(b"x" * 65536)
                await resp.write(b"\n\n")
                await resp.write_eof()
            except (ConnectionError, RuntimeError):
                pass
            return resp
        for i, piece in enumerate(pieces):
            if f.token_interval_ms:
                await asyncio.sleep(f.token_interval_ms / 1000)
            if f.reset_mid_stream and i >= 2:
                request.transport.close()  # type: ignore[union-attr]
                return resp
            chunk = {**base, "choices": [{"index": 0, "delta": {"content": (" " if i else "") + piece},
                                          "finish_reason": None}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        call = _forced_call(body, last)
        if call is not None:  # the call's name first, then its arguments in two pieces, as OpenAI streams
            args = call["function"]["arguments"]
            for delta in ({"index": 0, "id": call["id"], "type": "function",
                           "function": {"name": call["function"]["name"], "arguments": ""}},
                          {"index": 0, "function": {"arguments": args[:len(args) // 2]}},
                          {"index": 0, "function": {"arguments": args[len(args) // 2:]}}):
                chunk = {**base, "choices": [{"index": 0, "delta": {"tool_calls": [delta]}, "finish_reason": None}]}
                await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        finish = "stop" if call is None else "tool_calls"
        done = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
        await resp.write(b"data: " + orjson.dumps(done) + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage") and not f.omit_usage:
            usage = {**base, "choices": [], "usage": f.usage or {"prompt_tokens": prompt_tokens,
                                                      "completion_tokens": len(words),
                                                      "total_tokens": prompt_tokens + len(words)}}
            await resp.write(b"data: " + orjson.dumps(usage) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    # ---- OpenAI Responses (native) ------------------------------------------------------------

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """A provider that speaks the Responses API natively: the same answer as chat, in its shape."""
        from trex_serve.api.responses import chat_to_response, responses_to_chat
        from trex_serve.api.responses_stream import ResponsesStream

        self.stats["requests"] += 1
        self.stats["last_auth"] = request.headers.get("Authorization")
        try:
            body = orjson.loads(await request.read())
            # Hosted tools (web_search, code_interpreter, ...) are the provider's own: never called here.
            chat_body = responses_to_chat({**body, "tools": [t for t in body.get("tools") or []
                                                             if t.get("type") in ("function", "namespace")]})
        except (orjson.JSONDecodeError, ValueError, TypeError, AttributeError):
            self._count(400)
            return web.json_response({"error": {"message": "bad request", "type": "invalid_request_error",
                                                "code": "invalid_request"}}, status=400)
        self.stats["last_model"] = body.get("model")
        self.stats["last_body"] = body
        faulted = await self._fault(request)
        if faulted is not None:
            return faulted
        messages = chat_body.get("messages") or []
        last = next((m.get("content") for m in reversed(messages) if isinstance(m, dict)), "") or ""
        text = f"Hello from {self.name} (responses)! You said: {str(last)[:200]}"
        prompt_tokens = sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict)) // 4 + 1
        words = text.split(" ")
        usage = self.faults.usage or {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                                      "total_tokens": prompt_tokens + len(words)}
        chat = {"id": "chatcmpl-" + uuid.uuid4().hex[:12], "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model"), "usage": usage,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
        self._count(200)
        if not body.get("stream"):
            return web.json_response(chat_to_response(chat, body))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        stream = ResponsesStream(body)
        base = {"id": chat["id"], "object": "chat.completion.chunk", "created": chat["created"],
                "model": body.get("model")}
        events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": w if not i else " " + w},
                                        "finish_reason": None}]} for i, w in enumerate(words)]
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        events.append({**base, "choices": [], "usage": usage})
        for event in events:
            if self.faults.token_interval_ms:
                await asyncio.sleep(self.faults.token_interval_ms / 1000)
            out = stream.feed(b"data: " + orjson.dumps(event) + b"\n\n")
            if out:
                await resp.write(out)
        await resp.write(stream.feed(b"data: [DONE]\n\n") + stream.finish())
        await resp.write_eof()
        return resp
