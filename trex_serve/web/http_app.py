"""The gateway's HTTP surface (FastAPI). Thin: read the request, hand it to the pipeline, write the
answer. The Ray ingress deployment wraps this same app."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from trex_serve.admission.client_ip import client_address
from trex_serve.errors import InvalidRequest, TrexError
from trex_serve.pipeline.request_path import Pipeline
from trex_serve.pipeline.settle_and_answer import Answer
from trex_serve.pipeline.stored_responses import stored_response
from trex_serve.settings import Settings
from trex_serve.web import openapi
from trex_serve.web.front_id import front_secret, trusted_request_id
from trex_serve.web.headers_and_refusals import (
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


async def read_body(request: Request, limit: int) -> bytes:
    check_declared_length(request.headers.get("content-length"), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def render(answer: Answer) -> Response:
    if answer.stream is not None:
        return StreamingResponse(answer.stream, status_code=answer.status, headers=stream_headers(answer),
                                 media_type=answer.media_type)
    # A settlement still finishing is awaited after the answer is sent, inside the request.
    background = BackgroundTask(_finish, answer.settling) if answer.settling is not None else None
    return Response(answer.body, status_code=answer.status, headers=answer.headers,
                    media_type=answer.media_type, background=background)


async def _finish(settling: asyncio.Task) -> None:
    with contextlib.suppress(Exception):  # logged where it failed (pipeline/settle_and_answer.py)
        await settling


def error_response(exc: TrexError, request_id: str | None = None) -> Response:
    status, headers, body = refusal(exc, request_id)
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def anthropic_error_response(exc: TrexError) -> Response:
    status, headers, body = anthropic_refusal(exc)
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as the OpenAI envelope: ours, FastAPI's validation, and the unexpected."""

    @app.exception_handler(TrexError)
    async def _trex_error(_request: Request, exc: TrexError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
        return error_response(TrexError(str(exc.detail), status=exc.status_code, code=code,
                                        type="invalid_request_error"))

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> Response:
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        return error_response(InvalidRequest(f"Invalid value for '{param}': {err.get('msg')}", param=param))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> Response:
        return error_response(as_trex_error(exc))


CONTROL_PREFIXES = ("/admin/", "/metrics", "/dashboard", "/v1/dashboard/")


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class SubAppDispatch:
    """Sends the control surface (operator and account APIs, metrics, dashboard) to the control
    app, which is built later than this app, inside the replica. A change that arrives a second time
    under the same front-assigned request id (Serve's HAProxy replays a request whose replica died
    before answering) is refused, never applied twice: a credit grant is not idempotent."""

    def __init__(self, app: Any, prefixes: tuple[str, ...], sub_app_ref: Callable[[], Awaitable[Any]],
                 pipeline_ref: Callable[[], Awaitable[Pipeline]] | None = None) -> None:
        self.app = app
        self.prefixes = prefixes
        self.sub_app_ref = sub_app_ref
        self.pipeline_ref = pipeline_ref

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefixes):
            sub = await self.sub_app_ref()
            if sub is not None:
                rid = await self._replayed(scope)
                if rid is not None:
                    exc = TrexError("This request reached the gateway a second time (the replica handling it "
                                    "was lost) and was not applied again; check whether the first took effect.",
                                    status=409, code="request_replayed", type="invalid_request_error")
                    await error_response(exc, rid)(scope, receive, send)
                    return
                await sub(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _replayed(self, scope: dict) -> str | None:
        if scope["method"] in SAFE_METHODS or self.pipeline_ref is None:
            return None
        pipeline = await self.pipeline_ref()
        rid = trusted_request_id(Headers(scope=scope), front_secret(pipeline.settings.secret_key))
        if rid is None or await pipeline.gate.first_delivery(rid):
            return None
        return rid


def build_http_app(pipeline_ref: Callable[[], Awaitable[Pipeline]],
                   admin_ref: Callable[[], Awaitable[Any]] | None = None,
                   extra: Callable[[FastAPI], Any] | None = None) -> FastAPI:
    """``pipeline_ref`` returns the live pipeline (built inside a replica, after the app exists);
    ``admin_ref`` the operator app, served under /admin/."""
    app = FastAPI(title="Trex Serve", version="0.1.0", docs_url=None, redoc_url=None)
    if admin_ref is not None:
        app.add_middleware(SubAppDispatch, prefixes=CONTROL_PREFIXES, sub_app_ref=admin_ref,
                           pipeline_ref=pipeline_ref)

    def ip(request: Request, settings: Settings) -> str:
        peer = request.client.host if request.client else None
        # Several proxies may each add their own header line: read them as one list, in order.
        forwarded = ", ".join(request.headers.getlist("x-forwarded-for")) or None
        return client_address(peer, forwarded, settings.trusted_proxies)

    def front_id(request: Request, settings: Settings) -> str | None:
        return trusted_request_id(request.headers, front_secret(settings.secret_key))

    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        pipeline = await pipeline_ref()
        body = await read_body(request, pipeline.settings.max_body_bytes)
        answer = await pipeline.chat(body, request.headers.get("authorization"), ip(request, pipeline.settings),
                                     upstream_key(request.headers), front_id(request, pipeline.settings),
                                     trace_carrier=request.headers)
        return render(answer)

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        pipeline = await pipeline_ref()
        body = await read_body(request, pipeline.settings.max_body_bytes)
        answer = await pipeline.responses(body, request.headers.get("authorization"),
                                          ip(request, pipeline.settings), upstream_key(request.headers),
                                          front_id(request, pipeline.settings), trace_carrier=request.headers)
        return render(answer)

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        pipeline = await pipeline_ref()
        try:
            body = await read_body(request, pipeline.settings.max_body_bytes)
            key = upstream_key(request.headers)
        except TrexError as exc:
            return anthropic_error_response(exc)
        answer = await pipeline.messages(body, anthropic_auth(request.headers), ip(request, pipeline.settings),
                                         key, front_id(request, pipeline.settings),
                                         trace_carrier=request.headers,
                                         client_headers=anthropic_client_headers(request.headers))
        return render(answer)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> Response:
        pipeline = await pipeline_ref()
        try:
            body = await read_body(request, pipeline.settings.max_body_bytes)
        except TrexError as exc:
            return anthropic_error_response(exc)
        return render(await pipeline.count_tokens(body, anthropic_auth(request.headers),
                                                  ip(request, pipeline.settings),
                                                  anthropic_client_headers(request.headers)))

    @app.head("/")
    async def head_root() -> Response:
        return Response(status_code=200)  # Claude Code's reachability check before its first request

    async def stored(request: Request) -> Response:
        """Stored responses: retrieve, delete, input items (pipeline/stored_responses.py)."""
        pipeline = await pipeline_ref()
        return render(await stored_response(pipeline, request.method, request.scope["path"], request.query_params,
                                            request.headers.get("authorization"), ip(request, pipeline.settings)))

    # One handler, one OpenAPI operation per method and path (their ids must differ).
    for path, method, op in (("/v1/responses/{response_id}", "GET", "retrieve_response"),
                             ("/v1/responses/{response_id}", "DELETE", "delete_response"),
                             ("/v1/responses/{response_id}/input_items", "GET", "list_input_items")):
        app.add_api_route(path, stored, methods=[method], operation_id=op)

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        pipeline = await pipeline_ref()
        return render(await pipeline.models(request.headers.get("authorization"), ip(request, pipeline.settings),
                                            trace_carrier=request.headers))

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> Response:
        pipeline = await pipeline_ref()
        client = ip(request, pipeline.settings)
        return render(await pipeline.models(request.headers.get("authorization"), client, model_id,
                                            trace_carrier=request.headers))

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        await pipeline_ref()
        return JSONResponse({"status": "ready"})

    if extra is not None:
        extra(app)
    openapi.install(app)
    return app
