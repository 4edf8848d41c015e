"""A fault-injectable mock upstream speaking the OpenAI chat API and the Anthropic Messages API
(a real HTTP server process).
Behaviour is switchable at run time: POST /_control with any of the Faults fields.
Used by the offline demo, the tests, the benchmarks and the load tests."""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Faults:
    latency_ms: float = 0.0          # before the answer's headers
    error_rate: float = 0.0          # fraction of requests answered with error_status
    error_status: int = 503
    fail_next: int = 0               # the next N requests fail with error_status, deterministically
    retry_after: float | None = None  # sent with 429/503 errors
    hang_rate: float = 0.0           # fraction of requests that never answer
    reset_rate: float = 0.0          # fraction of requests whose connection is dropped before answering
    reset_mid_stream: bool = False   # streams drop the connection after a few chunks
    stream_chunks: int = 8           # content chunks per stream
    token_interval_ms: float = 0.0   # pacing between stream chunks
    first_byte_delay_ms: float = 0.0  # streams: delay after headers before the first chunk
    malformed_rate: float = 0.0      # fraction answered 200 with a broken JSON body
    require_key: str | None = None   # when set, 401 unless Authorization: Bearer <require_key>
    omit_usage: bool = False         # answer without usage
    giant_body_bytes: int = 0        # non-streaming chat: a valid answer padded to about this many bytes
    endless_stream: bool = False     # chat streams never end (paced by token_interval_ms)
    giant_sse_line_bytes: int = 0    # chat streams: after the first chunk, one SSE line this long, no newline
    echo_key_in_errors: bool = False  # error messages quote the credential received (as some providers do)
    # Per credential received (the bearer token, or x-api-key): {"sk-b": {"status": 429, "retry_after": 5}}
    # answers that status to that key alone; key_rpm {"sk-a": 20} refuses a key's 21st request in any
    # rolling 60 s with 429, as a provider enforcing the key's budget would (counted in rpm_refused).
    key_faults: dict[str, dict[str, Any]] = field(default_factory=dict)
    key_rpm: dict[str, int] = field(default_factory=dict)


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


class MockUpstream:
    def __init__(self, name: str = "mock") -> None:
        self.name = name
        self.faults = Faults()
        self.stats: dict[str, Any] = {"requests": 0, "by_status": {}, "last_auth": None, "last_model": None,
                                      "last_body": None, "last_traceparent": None, "by_key": {}, "rpm_refused": {}}
        self._key_log: dict[str, deque[float]] = {}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/_control", self.control)
        app.router.add_get("/_control", self.get_control)
        app.router.add_post("/_reset", self.reset)
        app.router.add_get("/_stats", self.get_stats)
        return app

    # ---- control ------------------------------------------------------------------------------

    async def control(self, request: web.Request) -> web.Response:
        data = await request.json()
        known = {f.name for f in fields(Faults)}
        unknown = set(data) - known
        if unknown:
            return web.json_response({"error": f"unknown fault fields: {sorted(unknown)}"}, status=400)
        for k, v in data.items():
            setattr(self.faults, k, v)
        return web.json_response(asdict(self.faults))

    async def get_control(self, _request: web.Request) -> web.Response:
        return web.json_response(asdict(self.faults))

    async def reset(self, _request: web.Request) -> web.Response:
        self.faults = Faults()
        self.stats.update(requests=0, by_status={}, last_auth=None, last_model=None, last_body=None,
                          last_traceparent=None, by_key={}, rpm_refused={})
        self._key_log = {}
        return web.json_response({"ok": True})

    async def get_stats(self, _request: web.Request) -> web.Response:
        return web.json_response(self.stats)

    def _count(self, status: int) -> None:
        key = str(status)
        self.stats["by_status"][key] = self.stats["by_status"].get(key, 0) + 1

    # ---- API ----------------------------------------------------------------------------------

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "mock-model", "object": "model",
                                                              "created": 0, "owned_by": self.name}]})

    async def _fault(self, request: web.Request, anthropic: bool = False) -> web.StreamResponse | None:
        """Apply the configured faults; a response means: answer this instead. `anthropic` shapes
        the key check and the error bodies the way Anthropic's Messages API does."""
        f = self.faults
        # W3C trace context as a provider would receive it (tests check the trace reaches here).
        self.stats["last_traceparent"] = request.headers.get("traceparent")
        if f.latency_ms:
            await asyncio.sleep(f.latency_ms / 1000)
        if f.hang_rate and random.random() < f.hang_rate:
            await asyncio.sleep(3600)
        if f.reset_rate and random.random() < f.reset_rate:
            request.transport.close()  # type: ignore[union-attr]
            raise asyncio.CancelledError
        keyed = self._key_fault(request, anthropic)
        if keyed is not None:
            return keyed
        if anthropic:
            if f.require_key and request.headers.get("x-api-key") != f.require_key:
                self._count(401)
                return _anthropic_error(401, "invalid x-api-key")
        elif f.require_key and request.headers.get("Authorization") != f"Bearer {f.require_key}":
            self._count(401)
            echoed = f": {request.headers.get('Authorization', '')[7:]}" if f.echo_key_in_errors else "."
            return web.json_response({"error": {"message": f"Incorrect API key provided{echoed}",
                                                "type": "invalid_request_error", "code": "invalid_api_key"}},
                                     status=401)
        failing = f.fail_next > 0 or (f.error_rate and random.random() < f.error_rate)
        if failing:
            if f.fail_next > 0:
                f.fail_next -= 1
            headers = {"Retry-After": str(f.retry_after)} if f.retry_after is not None else {}
            self._count(f.error_status)
            if anthropic:
                return _anthropic_error(f.error_status, f"{self.name} injected {f.error_status}", headers)
            code = {429: "rate_limit_exceeded", 400: "invalid_request_error"}.get(f.error_status, "server_error")
            key_note = f" (key {request.headers.get('Authorization', '')[7:]})" if f.echo_key_in_errors else ""
            return web.json_response({"error": {"message": f"{self.name} injected {f.error_status}{key_note}",
                                                "type": code, "code": code}},
                                     status=f.error_status, headers=headers)
        return None

    def _key_fault(self, request: web.Request, anthropic: bool) -> web.Response | None:
        """Count the credential received; answer its per-key fault or its rpm refusal, if any."""
        key = request.headers.get("x-api-key", "") if anthropic else request.headers.get("Authorization", "")[7:]
        by_key = self.stats["by_key"]
        by_key[key] = by_key.get(key, 0) + 1
        rule = self.faults.key_faults.get(key)
        status, retry_after = None, None
        if rule:
            status, retry_after = int(rule.get("status", 429)), rule.get("retry_after")
        elif key in self.faults.key_rpm:
            now = time.monotonic()
            log = self._key_log.setdefault(key, deque())
            while log and log[0] <= now - 60:
                log.popleft()
            if len(log) >= int(self.faults.key_rpm[key]):
                refused = self.stats["rpm_refused"]
                refused[key] = refused.get(key, 0) + 1
                status, retry_after = 429, max(1, int(log[0] + 60 - now))
            else:
                log.append(now)
        if status is None:
            return None
        self._count(status)
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        if anthropic:
            return _anthropic_error(status, f"{self.name}: key refused with {status}", headers)
        code = {429: "rate_limit_exceeded", 401: "invalid_api_key", 403: "permission_denied"}.get(status, "error")
        return web.json_response({"error": {"message": f"{self.name}: key refused with {status}", "type": code,
                                            "code": code}}, status=status, headers=headers)

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
        if not self.faults.omit_usage:
            answer["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
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
        done = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await resp.write(b"data: " + orjson.dumps(done) + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage") and not f.omit_usage:
            usage = {**base, "choices": [], "usage": {"prompt_tokens": prompt_tokens,
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
            chat_body = responses_to_chat(body)
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
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
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

    # ---- Anthropic Messages -------------------------------------------------------------------

    async def messages(self, request: web.Request) -> web.StreamResponse:
        self.stats["requests"] += 1
        self.stats["last_auth"] = request.headers.get("x-api-key")
        try:
            body = orjson.loads(await request.read())
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
        if body.get("stream"):
            return await self._anthropic_stream(request, body, text, prompt_tokens, tool)
        if self.faults.malformed_rate and random.random() < self.faults.malformed_rate:
            self._count(200)
            return web.Response(body=b'{"id": "broken", "content": [', content_type="application/json")
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        if tool is not None:
            content.append(tool)
        answer: dict[str, Any] = {
            "id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant",
            "model": body.get("model"), "content": content,
            "stop_reason": "tool_use" if tool else "end_turn", "stop_sequence": None,
        }
        if not self.faults.omit_usage:
            answer["usage"] = {"input_tokens": prompt_tokens, "output_tokens": len(text.split(" ")),
                               "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        self._count(200)
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def _anthropic_stream(self, request: web.Request, body: dict, text: str, prompt_tokens: int,
                                tool: dict[str, Any] | None) -> web.StreamResponse:
        f = self.faults
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        self._count(200)
        if f.first_byte_delay_ms:
            await asyncio.sleep(f.first_byte_delay_ms / 1000)
        words = text.split(" ")
        usage = {} if f.omit_usage else {"input_tokens": prompt_tokens, "output_tokens": 1}
        await resp.write(_sse("message_start", {"type": "message_start", "message": {
            "id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant",
            "model": body.get("model"), "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": usage}}))
        await resp.write(_sse("content_block_start", {"type": "content_block_start", "index": 0,
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
                "type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": (" " if i else "") + piece}}))
        await resp.write(_sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
        if tool is not None:
            args = orjson.dumps(tool["input"]).decode()
            await resp.write(_sse("content_block_start", {"type": "content_block_start", "index": 1,
                                                          "content_block": {**tool, "input": {}}}))
            for part in (args[:len(args) // 2], args[len(args) // 2:]):
                await resp.write(_sse("content_block_delta", {
                    "type": "content_block_delta", "index": 1,
                    "delta": {"type": "input_json_delta", "partial_json": part}}))
            await resp.write(_sse("content_block_stop", {"type": "content_block_stop", "index": 1}))
        delta: dict[str, Any] = {"type": "message_delta",
                                 "delta": {"stop_reason": "tool_use" if tool else "end_turn",
                                           "stop_sequence": None}}
        if not f.omit_usage:
            delta["usage"] = {"output_tokens": len(words)}
        await resp.write(_sse("message_delta", delta))
        await resp.write(_sse("message_stop", {"type": "message_stop"}))
        await resp.write_eof()
        return resp


def serve_forever(port: int, name: str, host: str = "127.0.0.1") -> None:
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    web.run_app(MockUpstream(name).app(), host=host, port=port, access_log=None, print=None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="trex-serve mock-upstream")
    parser.add_argument("--port", type=int, default=9101)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="mock")
    args = parser.parse_args(argv)
    serve_forever(args.port, args.name, args.host)


if __name__ == "__main__":
    main()
