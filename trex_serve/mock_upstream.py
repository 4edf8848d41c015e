"""A fault-injectable mock upstream speaking the OpenAI chat API (a real HTTP server process).
Behaviour is switchable at run time: POST /_control with any of the Faults fields.
Used by the offline demo, the tests, the benchmarks and the load tests."""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from dataclasses import asdict, dataclass, fields
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


class MockUpstream:
    def __init__(self, name: str = "mock") -> None:
        self.name = name
        self.faults = Faults()
        self.stats: dict[str, Any] = {"requests": 0, "by_status": {}, "last_auth": None, "last_model": None,
                                      "last_body": None}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
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
        self.stats.update(requests=0, by_status={}, last_auth=None, last_model=None, last_body=None)
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

    async def _fault(self, request: web.Request) -> web.StreamResponse | None:
        """Apply the configured faults; a response means: answer this instead."""
        f = self.faults
        if f.latency_ms:
            await asyncio.sleep(f.latency_ms / 1000)
        if f.hang_rate and random.random() < f.hang_rate:
            await asyncio.sleep(3600)
        if f.reset_rate and random.random() < f.reset_rate:
            request.transport.close()  # type: ignore[union-attr]
            raise asyncio.CancelledError
        if f.require_key and request.headers.get("Authorization") != f"Bearer {f.require_key}":
            self._count(401)
            return web.json_response({"error": {"message": "Incorrect API key provided.",
                                                "type": "invalid_request_error", "code": "invalid_api_key"}},
                                     status=401)
        failing = f.fail_next > 0 or (f.error_rate and random.random() < f.error_rate)
        if failing:
            if f.fail_next > 0:
                f.fail_next -= 1
            headers = {"Retry-After": str(f.retry_after)} if f.retry_after is not None else {}
            self._count(f.error_status)
            code = {429: "rate_limit_exceeded", 400: "invalid_request_error"}.get(f.error_status, "server_error")
            return web.json_response({"error": {"message": f"{self.name} injected {f.error_status}",
                                                "type": code, "code": code}},
                                     status=f.error_status, headers=headers)
        return None

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
