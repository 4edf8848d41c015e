"""The HTTP server inside each provider-pool replica: takes one hop request from an ingress,
calls the upstream through the provider's adapter, and relays the answer back as it is read."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable

import aiohttp
import orjson

from trex_serve.catalog import Provider
from trex_serve.hop import contract as hop
from trex_serve.hop import pool_tracing
from trex_serve.hop.lean_client import AnswerCut, AnswerTooLarge
from trex_serve.hop.lean_messages import Request, Response, StreamResponse
from trex_serve.hop.lean_server import LeanServer
from trex_serve.hop.pool_failures import failure_response, redact, redacted, upstream_retry_after
from trex_serve.hop.upstream_client import ConnectFailed, UpstreamAnswer, UpstreamClient, proxied
from trex_serve.observability import tracing
from trex_serve.providers.registry import adapter_for

MAX_RESPONSE_BYTES = 32 * 1024 * 1024
MAX_HOP_BODY_BYTES = 64 * 1024 * 1024
MAX_STREAM_SECONDS = 900.0
# A stream's bytes that have not yet completed an event the translator can emit: bounded, so an
# upstream that sends one endless SSE line cannot grow the replica's memory without limit.
MAX_SSE_EVENT_BYTES = 4 * 1024 * 1024


def max_stream_seconds(provider: Provider) -> float:
    """A provider's ``max_stream_s`` (when the catalog has that field) or the module default."""
    value = getattr(provider, "max_stream_s", None)
    return float(value) if value else MAX_STREAM_SECONDS


class _EventTooLarge(Exception):
    pass


class PoolServer:
    def __init__(self, providers: dict[str, Provider], secret: str,
                 report: Callable[[hop.Outcome], None] | None = None, max_connections: int = 1024) -> None:
        self.providers = providers
        self.secret = secret.encode()
        self.report = report or (lambda _o: None)
        self.max_connections = max_connections
        self.inflight = 0
        self.session: aiohttp.ClientSession | None = None
        self.lean: UpstreamClient | None = None  # whole answers; None: aiohttp's session for all
        self._server: LeanServer | None = None
        self.port: int | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        connector = aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=30,
                                         enable_cleanup_closed=True)
        # No cookie jar: one session serves every account, so an upstream's Set-Cookie must never
        # ride along on another account's request (and the jar's lookup costs on every request).
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                             cookie_jar=aiohttp.DummyCookieJar(),
                                             skip_auto_headers=("User-Agent",))
        if not proxied():
            self.lean = UpstreamClient(self.max_connections)
        tracing.setup("pool")
        self._server = LeanServer(self._route, MAX_HOP_BODY_BYTES)
        self.port = await self._server.start(host, port)
        return self.port

    async def stop(self, drain_s: float = 0.0) -> None:
        """With ``drain_s``: keep serving for a short grace period (ingress replicas may still hold
        the old routing view and send new requests here), then until the requests in flight are
        done (bounded by ``drain_s``), then stop."""
        if self._server is not None:
            started = time.monotonic()
            grace = min(2.0, drain_s)
            while time.monotonic() - started < drain_s and (
                    time.monotonic() - started < grace or self.inflight):
                await asyncio.sleep(0.05)
            await self._server.stop()
        if self.lean is not None:
            await self.lean.close()
        if self.session is not None:
            await self.session.close()

    async def _route(self, request: Request) -> Response | StreamResponse:
        if request.path == "/relay":
            if request.method != "POST":
                return Response(405, b"405: Method Not Allowed", {"Allow": "POST"}, "text/plain")
            return await self.relay(request)
        if request.path == "/healthz" and request.method == "GET":
            return Response(body=orjson.dumps({"ok": True, "inflight": self.inflight}),
                            content_type="application/json")
        return Response(404, b"404: Not Found", content_type="text/plain")

    async def relay(self, request: Request) -> Response | StreamResponse:
        given = request.headers.get(hop.H_SECRET, "").encode()
        if not hmac.compare_digest(given, self.secret):
            return Response(403, b"forbidden", content_type="text/plain")
        if request.oversize:
            return Response(413, f"the hop body exceeds {MAX_HOP_BODY_BYTES} bytes".encode(),
                            content_type="text/plain")
        self.inflight += 1
        try:
            return await pool_tracing.relayed(self._relay, request, self.providers, request.headers)
        finally:
            self.inflight -= 1

    async def _relay(self, request: Request) -> Response | StreamResponse:
        h = request.headers
        provider = self.providers.get(h.get(hop.H_PROVIDER, ""))
        if provider is None:
            return failure_response(502, "bad_response", "unknown provider on this pool")
        model = h.get(hop.H_MODEL, "")
        api = h.get(hop.H_API, "chat")
        stream = h.get(hop.H_STREAM) == "1"
        adapter = adapter_for(provider.format)
        raw = request.body
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return failure_response(400, "bad_request", "hop body is not JSON")
        key_id = h.get(hop.H_KEY_ID)
        api_key = h.get(hop.H_KEY) or (self._pooled_key(provider, key_id) if key_id else provider.managed_key())
        if key_id and api_key is None:
            # The ingress offered a key this replica cannot send: out, like a revoked one.
            return failure_response(401, "key_unset", f"managed key {key_id} of {provider.name} is not set on the pool")
        prefix = hop.H_CLIENT_PREFIX.lower()
        client = {k[len(prefix):].lower(): v for k, v in h.items()
                  if k.lower().startswith(prefix)} if api in ("messages", "count_tokens") else None
        try:
            call = adapter.build(api, body, model, stream, api_key, provider, thinking=h.get(hop.H_THINKING),
                                 client_headers=client, raw=raw)
        except TypeError:  # orjson reads 1,024 levels of nesting but writes only 255
            return failure_response(400, "bad_request", "The request body is nested too deeply.")
        tracing.inject(call.headers)
        started = time.monotonic()
        target = None if stream or self.lean is None else self.lean.target(call.url)

        def outcome(ok: bool, status: int, retry_after: float | None = None) -> None:
            if key_id and status in (401, 403, 429):
                return  # one managed key's trouble: the ingress moves to another key, the provider is fine
            self.report(hop.Outcome(provider.name, model, ok, (time.monotonic() - started) * 1000,
                                status, retry_after))

        try:
            async with asyncio.timeout(provider.first_byte_timeout):
                if target is not None:
                    upstream = await self.lean.post(target, call.headers, call.body,  # type: ignore[union-attr]
                                                    provider.connect_timeout_s, MAX_RESPONSE_BYTES)
                else:
                    timeout = aiohttp.ClientTimeout(total=None, sock_connect=provider.connect_timeout_s)
                    upstream = await self.session.post(call.url, data=call.body, headers=call.headers,  # type: ignore[union-attr]
                                                       timeout=timeout)
        except TimeoutError:
            outcome(False, 504)
            return failure_response(504, "first_byte_timeout", f"{provider.name} sent no answer in time")
        except (aiohttp.ClientConnectorError, ConnectFailed):
            outcome(False, 502)
            return failure_response(502, "connect", f"cannot connect to {provider.name}")
        except (aiohttp.ClientError, ConnectionError, AnswerCut) as exc:
            outcome(False, 502)
            return failure_response(502, "reset", f"{provider.name} closed the connection: {type(exc).__name__}")
        try:
            if upstream.status != 200:
                return await self._upstream_error(upstream, adapter, provider, outcome, api_key)
            if stream:
                return await self._stream(request, upstream, adapter, provider, api, model, h, outcome)
            return await self._whole(upstream, adapter, provider, api, outcome, started)
        finally:
            upstream.release()

    @staticmethod
    def _pooled_key(provider: Provider, key_id: str) -> str | None:
        spec = provider.upstream_key(key_id)
        return spec.secret() if spec is not None else None

    async def _upstream_error(self, upstream, adapter, provider, outcome, api_key: str | None = None) -> Response:
        retry_after = upstream_retry_after(upstream.headers)
        try:
            async with asyncio.timeout(provider.timeout_s):
                if isinstance(upstream, UpstreamAnswer):
                    raw = (await upstream.read())[:64 * 1024]
                else:
                    raw = await upstream.content.read(64 * 1024)
        except (TimeoutError, aiohttp.ClientError, AnswerCut):
            raw = b""
        err = adapter.translate_error(upstream.status, raw)
        status = upstream.status
        retryable = status in hop.RETRYABLE_STATUS
        outcome(not retryable and status < 500, status, retry_after if status in (429, 503, 529) else None)
        headers = {"Content-Type": "application/json"}
        if retry_after is not None:
            headers["Retry-After"] = str(int(retry_after))
        # Every field is the upstream's text, and any of them may quote the key it was sent.
        body = orjson.dumps({"error": {"message": redact(err.message, api_key), "type": redact(err.type, api_key),
                                       "code": redacted(err.code, api_key), "param": redacted(err.param, api_key)}})
        return Response(status=status, body=body, headers=headers)

    async def _whole(self, upstream, adapter, provider, api, outcome, started) -> Response:
        try:
            async with asyncio.timeout(max(0.1, provider.timeout_s - (time.monotonic() - started))):
                if isinstance(upstream, UpstreamAnswer):
                    raw: bytes | None = await upstream.read()
                else:
                    raw = await upstream.content.read(MAX_RESPONSE_BYTES + 1)
                    while not upstream.content.at_eof() and len(raw) <= MAX_RESPONSE_BYTES:
                        raw += await upstream.content.read(MAX_RESPONSE_BYTES + 1 - len(raw))
        except TimeoutError:
            outcome(False, 504)
            return failure_response(504, "timeout", f"{provider.name} did not finish in {provider.timeout_s}s")
        except AnswerTooLarge:
            raw = None  # the lean client stops reading at MAX_RESPONSE_BYTES
        except (aiohttp.ClientError, ConnectionError, AnswerCut):
            outcome(False, 502)
            return failure_response(502, "reset", f"{provider.name} closed the connection mid-answer")
        if raw is None or len(raw) > MAX_RESPONSE_BYTES:
            outcome(False, 502)
            return failure_response(502, "bad_response", f"{provider.name} answer exceeds {MAX_RESPONSE_BYTES} bytes")
        try:
            body, usage = adapter.translate_response(api, raw)
        except ValueError as exc:
            outcome(False, 502)
            return failure_response(502, "bad_response", f"{provider.name}: {exc}")
        outcome(True, 200)
        headers = {"Content-Type": "application/json"}
        if usage is not None:
            headers[hop.H_USAGE] = usage.header()
        return Response(status=200, body=body, headers=headers)

    async def _stream(self, request, upstream, adapter, provider, api, model, h, outcome) -> Response | StreamResponse:
        translator = adapter.stream_translator(api, h.get(hop.H_WANT_USAGE) == "1", model)
        content = upstream.content
        # Nothing is sent to the ingress until the upstream's first bytes arrive: up to then a
        # failure is still a clean, retryable answer the ingress can fall back from.
        first = b""
        unsent = 0
        try:
            async with asyncio.timeout(provider.first_byte_timeout):
                while not first:
                    chunk = await content.readany()
                    if not chunk:
                        break
                    unsent += len(chunk)
                    if unsent > MAX_SSE_EVENT_BYTES:
                        outcome(False, 502)
                        return failure_response(502, "bad_response",
                                        f"{provider.name} sent over {MAX_SSE_EVENT_BYTES} bytes without an event")
                    first = translator.feed(chunk)
        except TimeoutError:
            outcome(False, 504)
            return failure_response(504, "first_byte_timeout", f"{provider.name} sent no stream data in time")
        except (aiohttp.ClientError, ConnectionError):
            outcome(False, 502)
            return failure_response(502, "reset", f"{provider.name} closed the stream before any data")
        if not first:
            outcome(False, 502)
            return failure_response(502, "bad_response", f"{provider.name} ended the stream without data")
        response = StreamResponse(status=200, headers={"Content-Type": "text/event-stream",
                                                           "Cache-Control": "no-cache"})
        await response.prepare(request)
        await response.write(first)
        ok = True
        limit_s = max_stream_seconds(provider)
        deadline = time.monotonic() + limit_s
        unsent = 0
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    # Checked on every chunk: an upstream that never pauses still meets the limit.
                    raise TimeoutError
                async with asyncio.timeout(min(provider.timeout_s, left)):
                    chunk = await content.readany()
                if not chunk:
                    break
                out = translator.feed(chunk)
                if out:
                    unsent = 0
                    await response.write(out)
                else:
                    unsent += len(chunk)
                    if unsent > MAX_SSE_EVENT_BYTES:
                        raise _EventTooLarge
        except (TimeoutError, _EventTooLarge, aiohttp.ClientError, ConnectionError) as exc:
            ok = False
            if isinstance(exc, ConnectionResetError) and request.disconnected:
                raise  # the ingress went away: nothing to tell it
            if isinstance(exc, TimeoutError) and time.monotonic() >= deadline:
                message, code = f"{provider.name} stream exceeded {limit_s:g}s", "upstream_stream_time_limit"
            elif isinstance(exc, _EventTooLarge):
                message, code = (f"{provider.name} sent over {MAX_SSE_EVENT_BYTES} bytes without an event",
                                 "upstream_stream_event_too_large")
            else:
                message, code = f"{provider.name} stream interrupted", "upstream_stream_interrupted"
            err = {"error": {"message": message, "type": "upstream_error", "code": code}}
            # In the client's own stream grammar where the translator has one (Anthropic's error event).
            error_event = getattr(translator, "error_event", None)
            failed = error_event(message, code) if error_event else b"data: " + orjson.dumps(err) + b"\n\n"
            tail = translator.finish()
            if isinstance(exc, _EventTooLarge):
                # Never forward the oversized fragment: only the usage comment for settlement.
                at = tail.rfind(b": trex-usage ")
                tail = tail[at:] if at >= 0 else b""
            try:
                await response.write(failed + tail)
            except (ConnectionError, RuntimeError):
                pass
            outcome(False, 502)
            return response
        try:
            await response.write(translator.finish())
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        outcome(ok, 200)
        return response
