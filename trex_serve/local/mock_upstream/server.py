"""The mock upstream's server: the fault switches (:class:`Faults`), the control endpoints
(``/_control``, ``/_reset``, ``/_stats``), the fault injection every answer goes through, and the
process entry point. The answers themselves are in ``openai.py`` and ``anthropic.py``."""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import orjson
from aiohttp import web

from trex_serve.local.mock_upstream.anthropic import AnthropicAnswers, _anthropic_error
from trex_serve.local.mock_upstream.openai import OpenAIAnswers


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
    # Report exactly this usage object, in the endpoint's own shape (OpenAI's prompt_tokens with
    # prompt_tokens_details, Anthropic's input_tokens with cache_read_input_tokens, ...), as a real
    # provider with prompt caching or reasoning would, instead of the mock's own count.
    usage: dict[str, Any] | None = None
    giant_body_bytes: int = 0        # non-streaming chat: a valid answer padded to about this many bytes
    endless_stream: bool = False     # chat streams never end (paced by token_interval_ms)
    giant_sse_line_bytes: int = 0    # chat streams: after the first chunk, one SSE line this long, no newline
    echo_key_in_errors: bool = False  # error messages quote the credential received (as some providers do)
    # Injected errors (fail_next, error_rate) answer this JSON body verbatim instead of the mock's own:
    # a provider's real error envelope. Every "{key}" in it becomes the credential received.
    error_body: Any = None
    set_cookie: str | None = None    # sent as Set-Cookie with every answer (the Cookie received is in stats)
    # Per credential received (the bearer token, or x-api-key): {"sk-b": {"status": 429, "retry_after": 5}}
    # answers that status to that key alone; key_rpm {"sk-a": 20} refuses a key's 21st request in any
    # rolling 60 s with 429, as a provider enforcing the key's budget would (counted in rpm_refused).
    key_faults: dict[str, dict[str, Any]] = field(default_factory=dict)
    key_rpm: dict[str, int] = field(default_factory=dict)


class MockUpstream(OpenAIAnswers, AnthropicAnswers):
    def __init__(self, name: str = "mock") -> None:
        self.name = name
        self.faults = Faults()
        self.stats: dict[str, Any] = {"requests": 0, "by_status": {}, "last_auth": None, "last_model": None,
                                      "last_body": None, "last_traceparent": None, "by_key": {}, "rpm_refused": {},
                                      "cookies_received": 0, "last_headers": None, "last_query": None,
                                      "last_raw": None}
        self._key_log: dict[str, deque[float]] = {}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/_control", self.control)
        app.router.add_get("/_control", self.get_control)
        app.router.add_post("/_reset", self.reset)
        app.router.add_get("/_stats", self.get_stats)
        app.on_response_prepare.append(self._set_cookie)
        return app

    async def _set_cookie(self, _request: web.Request, response: web.StreamResponse) -> None:
        if self.faults.set_cookie:
            response.headers["Set-Cookie"] = self.faults.set_cookie

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
                          last_traceparent=None, by_key={}, rpm_refused={}, cookies_received=0,
                          last_headers=None, last_query=None, last_raw=None)
        self._key_log = {}
        return web.json_response({"ok": True})

    async def get_stats(self, _request: web.Request) -> web.Response:
        return web.json_response(self.stats)

    def _count(self, status: int) -> None:
        key = str(status)
        self.stats["by_status"][key] = self.stats["by_status"].get(key, 0) + 1

    # ---- faults -------------------------------------------------------------------------------

    async def _fault(self, request: web.Request, anthropic: bool = False) -> web.StreamResponse | None:
        """Apply the configured faults; a response means: answer this instead. `anthropic` shapes
        the key check and the error bodies the way Anthropic's Messages API does."""
        f = self.faults
        # W3C trace context as a provider would receive it (tests check the trace reaches here).
        self.stats["last_traceparent"] = request.headers.get("traceparent")
        # Every header and query parameter as received, for catalog auth styles (api-key, api-version).
        self.stats["last_headers"] = dict(request.headers)
        self.stats["last_query"] = dict(request.query)
        if "Cookie" in request.headers:
            self.stats["cookies_received"] += 1
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
            if f.error_body is not None:
                return _verbatim_error(f.error_status, f.error_body, request, anthropic, headers)
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


def _verbatim_error(status: int, body: Any, request: web.Request, anthropic: bool,
                    headers: dict[str, str]) -> web.Response:
    key = request.headers.get("x-api-key", "") if anthropic else request.headers.get("Authorization", "")[7:]
    if isinstance(body, str):  # not JSON at all: a proxy's HTML page
        return web.Response(status=status, text=body.replace("{key}", key), headers=headers,
                            content_type="text/html")
    raw = orjson.dumps(body).replace(b"{key}", orjson.dumps(key)[1:-1])
    return web.Response(status=status, body=raw, headers=headers, content_type="application/json")


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
