"""The data plane's direct server: each ingress replica answers the hot routes (chat completions,
responses, models) on a port of its own, which the front proxy reaches without Serve's HAProxy,
Serve's replica machinery, uvicorn or FastAPI in the way (~0.8 ms of a 2 ms request, and most of
the ingress's CPU per request outside our code: docs/BENCHMARKS.md). It runs the same pipeline as
the FastAPI app (http_app.py) and writes the same answers; every other route stays on Serve.
It runs on the lean HTTP/1.1 server the pool replicas use too (hop/lean_server.py).

Only the front proxy may call it: a request without the front's signature is refused, so the
X-Forwarded-For the front proxy wrote (the client's own is dropped there) names the client."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable

from trex_serve.admission.client_ip import client_address
from trex_serve.errors import TrexError
from trex_serve.hop.lean_messages import Request, Response, StreamResponse
from trex_serve.hop.lean_server import LeanServer
from trex_serve.pipeline.request_path import Pipeline
from trex_serve.pipeline.settle_and_answer import Answer
from trex_serve.pipeline.stored_responses import is_stored_path, stored_response
from trex_serve.web.front_id import AUTH_HEADER, front_secret, trusted_request_id
from trex_serve.web.headers_and_refusals import (
    MESSAGES_PATHS,
    anthropic_auth,
    anthropic_client_headers,
    anthropic_refusal,
    as_trex_error,
    check_declared_length,
    refusal,
    stream_headers,
    too_large,
    upstream_key,
)

HEALTH_PATH = "/-/data-healthz"
_AUTH = AUTH_HEADER.lower()
# What the server reads of a body before the pipeline's own limit is known (its first request).
FIRST_BODY_CAP = 64 * 1024 * 1024


def forwarded_client(forwarded_for: str | None, peer: str | None) -> str:
    """The front proxy drops what the client sent and appends the peer it saw, and its signature
    makes it the one trusted proxy: X-Forwarded-For read past it (client_ip.py)."""
    return client_address(peer, forwarded_for, (peer,) if peer else ())


class DataServer:
    def __init__(self, pipeline_ref: Callable[[], Awaitable[Pipeline]]) -> None:
        self.pipeline_ref = pipeline_ref
        self.inflight = 0
        self.port: int | None = None
        self._server: LeanServer | None = None

    async def start(self, host: str, port: int = 0) -> int:
        self._server = LeanServer(self._handle, FIRST_BODY_CAP)
        self.port = await self._server.start(host, port)
        return self.port

    async def drain(self, timeout: float) -> None:
        """Wait for the requests in flight (streams included) to finish, up to ``timeout``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.inflight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()
            self._server = None

    async def _handle(self, request: Request) -> Response | StreamResponse:
        if request.path == HEALTH_PATH:
            await self.pipeline_ref()
            return Response(body=b'{"status":"ok"}', content_type="application/json")
        self.inflight += 1
        try:
            pipeline = await self.pipeline_ref()
            if self._server is not None:  # bodies past the limit are no longer read at all
                self._server.max_body = pipeline.settings.max_body_bytes
            secret = front_secret(pipeline.settings.secret_key)
            if not secret or not hmac.compare_digest(request.headers.get(_AUTH, "").encode(), secret.encode()):
                return _error(TrexError("This port takes requests from the gateway's front proxy only.",
                                        status=403, code="forbidden", type="invalid_request_error"))
            try:
                answer = await self._answer(request, pipeline, secret)
            except Exception as exc:  # every refusal leaves as the OpenAI envelope (Anthropic's on its routes)
                return _error(as_trex_error(exc), request.path in MESSAGES_PATHS)
            if answer.settling is not None:  # still in flight until settled (drain waits for it)
                self.inflight += 1
                answer.settling.add_done_callback(self._settled)
            return await _write(request, answer)
        finally:
            self.inflight -= 1

    def _settled(self, _task: object) -> None:
        self.inflight -= 1

    async def _answer(self, request: Request, pipeline: Pipeline, secret: str) -> Answer:
        headers = request.headers
        client = forwarded_client(headers.get("x-forwarded-for"), request.peer)
        auth = headers.get("authorization")
        path, method = request.path, request.method
        if method == "POST" and path in ("/v1/chat/completions", "/v1/responses"):
            body = _read_body(request, pipeline.settings.max_body_bytes)
            key = upstream_key(headers)
            front_id = trusted_request_id(headers, secret)
            handler = pipeline.chat if path == "/v1/chat/completions" else pipeline.responses
            return await handler(body, auth, client, key, front_id, trace_carrier=headers)
        if method == "POST" and path == "/v1/messages":
            body = _read_body(request, pipeline.settings.max_body_bytes)
            return await pipeline.messages(body, anthropic_auth(headers), client, upstream_key(headers),
                                           trusted_request_id(headers, secret), trace_carrier=headers,
                                           client_headers=anthropic_client_headers(headers))
        if method in ("GET", "DELETE") and is_stored_path(path):
            return await stored_response(pipeline, method, path, request.query, auth, client)
        if method == "GET" and path == "/v1/models":
            return await pipeline.models(auth, client, trace_carrier=headers)
        if method == "GET" and path.startswith("/v1/models/"):
            return await pipeline.models(auth, client, path[len("/v1/models/"):], trace_carrier=headers)
        # The front proxy sends nothing else here; say so plainly if something does.
        raise TrexError("Not Found", status=404, code="not_found", type="invalid_request_error")


def _read_body(request: Request, limit: int) -> bytes:
    """The server has read the body whole, or stopped past its limit (``oversize``); the limit
    checked here as well, for the bodies read before the server knew it."""
    check_declared_length(request.headers.get("content-length"), limit)
    if request.oversize or len(request.body) > limit:
        raise too_large(limit)
    return request.body


def _error(exc: TrexError, anthropic: bool = False) -> Response:
    status, headers, body = anthropic_refusal(exc) if anthropic else refusal(exc)
    return Response(status=status, headers=headers, body=body, content_type="application/json")


async def _write(request: Request, answer: Answer) -> Response | StreamResponse:
    if answer.stream is None:
        return Response(status=answer.status, headers=answer.headers, body=answer.body,
                        content_type=answer.media_type)
    response = StreamResponse(status=answer.status, headers=stream_headers(answer), content_type=answer.media_type)
    stream = answer.stream
    try:
        await response.prepare(request)
        async for chunk in stream:
            await response.write(chunk)
        await response.write_eof()
    except ConnectionError:
        pass  # the client left mid-stream; closing the stream (below) settles what was used
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
    return response
