"""Ingress side of the hop: send a HopRequest to a pool replica over a kept-alive connection and
hand back its answer, streaming bodies as read."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Protocol

import aiohttp
import orjson

from trex_serve.hop import contract as hop
from trex_serve.hop.lean_client import AnswerCut, LeanClient

# A provider key travels as an HTTP header value: printable ASCII only (no CR/LF/NUL, no
# non-ASCII, no spaces), and short enough for any upstream's header limits.
MAX_UPSTREAM_KEY_CHARS = 4096
_KEY_OK = re.compile(r"[\x21-\x7e]+")


def valid_upstream_key(value: str) -> bool:
    return len(value) <= MAX_UPSTREAM_KEY_CHARS and _KEY_OK.fullmatch(value) is not None


def invalid_key_response() -> hop.HopResponse:
    """The caller's X-Upstream-Api-Key cannot be sent as a header: a non-retryable 400 that names
    the header (and never echoes its value), before any byte leaves for a pool or an upstream."""
    body = orjson.dumps({"error": {"message": "X-Upstream-Api-Key must be printable ASCII without spaces "
                                              f"and at most {MAX_UPSTREAM_KEY_CHARS} characters.",
                                   "type": "invalid_request_error", "code": "invalid_request_error",
                                   "param": "X-Upstream-Api-Key"}})
    return hop.HopResponse(400, {}, body)


EndpointPicker = Callable[[str, set[tuple[str, int]]], Awaitable[tuple[str, int]]]


class EndpointTracker(Protocol):
    """Told of each request's life on an endpoint, for a picker that balances on its own counts."""

    def started(self, endpoint: tuple[str, int]) -> None: ...

    def finished(self, endpoint: tuple[str, int]) -> None: ...

    def unreachable(self, endpoint: tuple[str, int]) -> None: ...


def _then(close: Callable[[], Awaitable[None]], tracker: EndpointTracker,
          endpoint: tuple[str, int]) -> Callable[[], Awaitable[None]]:
    """A stream's close that also tells the tracker, once, that its request has ended."""
    done = False

    async def wrapped() -> None:
        nonlocal done
        try:
            await close()
        finally:
            if not done:
                done = True
                tracker.finished(endpoint)

    return wrapped


class HttpRelay:
    """A ProviderCaller. ``pick(provider, exclude)`` names a live pool replica (Serve's router in
    a deployment, a fixed address in tests); an unreachable replica is skipped, not failed."""

    def __init__(self, pick: EndpointPicker, secret: str, max_connections: int = 2048,
                 replica_tries: int = 5, tracker: EndpointTracker | None = None) -> None:
        self.pick = pick
        self.tracker = tracker
        self.secret = secret
        self.replica_tries = replica_tries
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._lean = LeanClient()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=60)
            # No cookie jar: nothing on this hop sets cookies, and a jar costs its lookup per request.
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                  cookie_jar=aiohttp.DummyCookieJar(),
                                                  skip_auto_headers=("User-Agent",),
                                                  timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def close(self) -> None:
        await self._lean.close()
        if self._session is not None:
            await self._session.close()

    async def __call__(self, req: hop.HopRequest) -> hop.HopResponse:
        headers = {
            hop.H_SECRET: self.secret,
            hop.H_REQUEST_ID: req.request_id,
            hop.H_PROVIDER: req.provider,
            hop.H_MODEL: req.upstream_model,
            hop.H_API: req.api,
            hop.H_STREAM: "1" if req.stream else "0",
            hop.H_WANT_USAGE: "1" if req.want_usage else "0",
            "Content-Type": "application/json",
        }
        if req.api_key:
            if not valid_upstream_key(req.api_key):
                return invalid_key_response()
            headers[hop.H_KEY] = req.api_key
        elif req.key_id:
            headers[hop.H_KEY_ID] = req.key_id
        if req.thinking:
            headers[hop.H_THINKING] = req.thinking
        for name, value in (req.client_headers or {}).items():
            headers[hop.H_CLIENT_PREFIX + name] = value
        if req.trace_headers:
            headers.update(req.trace_headers)
        tried: set[tuple[str, int]] = set()
        last: Exception | None = None
        for attempt in range(self.replica_tries):
            if attempt:
                # A replica going away during a roll-over: give the routing view a moment to move on.
                await asyncio.sleep(0.05 * 2 ** attempt)
            try:
                host, port = await self.pick(req.provider, tried)
            except Exception as exc:  # the pool deployment itself is unavailable (restarting, gone)
                last = exc
                continue
            endpoint = (host, port)
            tried.add(endpoint)
            tracker = self.tracker
            if tracker is not None:
                tracker.started(endpoint)
            whole: hop.HopResponse | None = None
            try:
                if req.stream:
                    resp = await self._client().post(f"http://{host}:{port}/relay", data=req.body,
                                                     headers=headers)
                else:
                    whole = await self._whole(host, port, headers, req.body)
            except (aiohttp.ClientError, OSError) as exc:
                # The replica died or went away before answering: another replica may serve it.
                last = self._unreachable(exc, endpoint)
                continue
            except BaseException:
                if tracker is not None:
                    tracker.finished(endpoint)
                raise
            if whole is not None:
                if tracker is not None:
                    tracker.finished(endpoint)
                return whole
            if tracker is None:
                return await self._wrap(resp, req.stream)
            try:
                out = await self._wrap(resp, req.stream)
            except BaseException:
                tracker.finished(endpoint)
                raise
            if out.close is None:
                tracker.finished(endpoint)
            else:
                out.close = _then(out.close, tracker, endpoint)
            return out
        raise hop.ReplicaUnreachable(f"no reachable replica for pool {req.provider}: {last}")

    def _unreachable(self, exc: Exception, endpoint: tuple[str, int]) -> Exception:
        if self.tracker is not None:
            self.tracker.finished(endpoint)
            self.tracker.unreachable(endpoint)
        return exc

    async def _whole(self, host: str, port: int, headers: dict[str, str], body: bytes) -> hop.HopResponse:
        try:
            status, answer_headers, answer = await self._lean.post(host, port, "/relay", headers, body)
        except AnswerCut:
            return hop.HopResponse(502, {}, b"", failure="reset")
        failure, retry_after, trex_headers = _head(answer_headers)
        return hop.HopResponse(status, trex_headers, answer, failure=failure, retry_after=retry_after)

    async def _wrap(self, resp: aiohttp.ClientResponse, stream: bool) -> hop.HopResponse:
        failure, retry_after, headers = _head(resp.headers)
        if stream and resp.status == 200 and failure is None:
            async def chunks() -> AsyncIterator[bytes]:
                async for chunk in resp.content.iter_any():
                    yield chunk

            async def close() -> None:
                resp.close()

            return hop.HopResponse(resp.status, headers, chunks=chunks(), close=close,
                                   retry_after=retry_after)
        try:
            body = await resp.read()
        except (aiohttp.ClientError, ConnectionError):
            resp.close()
            return hop.HopResponse(502, headers, b"", failure="reset")
        resp.release()
        return hop.HopResponse(resp.status, headers, body, failure=failure, retry_after=retry_after)


def _head(headers: Mapping[str, str]) -> tuple[str | None, float | None, dict[str, str]]:
    """What the ingress reads from a pool answer's head: the failure it names, Retry-After, and
    the X-Trex- headers it passes on."""
    retry_after = None
    if "Retry-After" in headers:
        try:
            retry_after = float(headers["Retry-After"])
        except ValueError:
            retry_after = None
    return headers.get(hop.H_FAILURE), retry_after, {k: v for k, v in headers.items() if k.startswith("X-Trex-")}
