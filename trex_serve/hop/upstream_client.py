"""A pool replica's client for whole (non-streamed) upstream answers: lean_client.py's kept-alive
connections over TCP or TLS, at most ``max_connections`` in use at once. aiohttp's client was ~20%
of a pool replica's CPU at load; it still carries streams, and any call this client does not take
(a proxy in the environment, a URL with userinfo or another scheme: ``target`` says None)."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from multidict import CIMultiDict

from trex_serve.hop.lean_client import MAX_ANSWER_BYTES, LeanClient, _Conn, request_bytes

_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
_DEFAULT_PORT = {"http": 80, "https": 443}


class ConnectFailed(ConnectionError):
    """No connection to the upstream (refused, unresolvable, TLS refused, or not within the connect
    timeout): nothing was sent."""


def proxied() -> bool:
    """Whether the environment names a proxy: this client speaks to upstreams directly only."""
    return any(os.environ.get(name) or os.environ.get(name.lower()) for name in _PROXY_VARS)


@dataclass(frozen=True, slots=True)
class Target:
    endpoint: tuple[str, str, int]  # scheme, host, port: one idle stack each
    host: str  # the Host header
    path: str  # the request target: path and query


def parse_target(url: str) -> Target | None:
    """The URL as this client sends it, or None for one it leaves to aiohttp."""
    if not url.isascii() or any(c <= " " or c == "\x7f" for c in url):
        return None  # yarl would quote these (or IDNA-encode a host): not ours to imitate
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORT or not parts.hostname or "@" in parts.netloc:
        return None
    host = parts.hostname
    name = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORT[parts.scheme]:
        name = f"{name}:{port}"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target((parts.scheme, host, port or _DEFAULT_PORT[parts.scheme]), name, path)


class UpstreamAnswer:
    """An answer whose head has come: ``read()`` waits for the rest, ``release()`` always follows."""

    __slots__ = ("status", "headers", "_client", "_endpoint", "_conn", "_released")

    def __init__(self, client: UpstreamClient, endpoint: Hashable, conn: _Conn) -> None:
        self.status = conn.status
        self.headers = CIMultiDict((n.decode("latin-1"), v.decode("latin-1")) for n, v in conn.headers)
        self._client, self._endpoint, self._conn = client, endpoint, conn
        self._released = False

    async def read(self) -> bytes:
        """The whole body; AnswerTooLarge past the client's limit, AnswerCut if it stops."""
        assert self._conn.done is not None
        try:
            await self._conn.done
        except BaseException:
            self._conn._abort()  # noqa: SLF001 - a deadline or a cut: the rest must not be read as an answer
            raise
        return b"".join(self._conn.body)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._client._checkin(self._endpoint, self._conn)  # noqa: SLF001 - reused only if complete
            self._client._slots.release()  # noqa: SLF001


class UpstreamClient(LeanClient):
    def __init__(self, max_connections: int = 1024, idle_s: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(idle_s)
        self._slots = asyncio.Semaphore(max_connections)
        self._ssl = ssl_context
        self._targets: dict[str, Target | None] = {}

    def target(self, url: str) -> Target | None:
        """``parse_target``, kept per URL: a pool calls a handful of URLs over and over."""
        try:
            return self._targets[url]
        except KeyError:
            if len(self._targets) >= 1024:
                self._targets.clear()  # URLs with a query of their own: bounded, never a leak
            found = self._targets[url] = parse_target(url)
            return found

    async def post(self, target: Target, headers: dict[str, str], body: bytes,
                   connect_timeout: float | None = None, limit: int = MAX_ANSWER_BYTES) -> UpstreamAnswer:
        """Sends the request and returns once the answer's head has come (the first byte's deadline
        is the caller's). Headers go out exactly as given, with Host and Content-Length only; a body
        past ``limit`` makes ``read()`` raise AnswerTooLarge."""
        data = request_bytes(target.path, target.host, headers, body)
        await self._slots.acquire()
        try:
            conn = await self._send(target.endpoint, data, head=True, connect_timeout=connect_timeout, limit=limit)
        except BaseException:
            self._slots.release()
            raise
        return UpstreamAnswer(self, target.endpoint, conn)

    def _address(self, endpoint: Hashable) -> tuple[str, int, dict[str, Any]]:
        scheme, host, port = endpoint  # type: ignore[misc]
        if scheme != "https":
            return host, port, {}
        if self._ssl is None:
            self._ssl = ssl.create_default_context()  # once: it reads the system's CA store
        return host, port, {"ssl": self._ssl, "server_hostname": host}

    async def _open(self, endpoint: Hashable, connect_timeout: float | None = None) -> _Conn:
        try:
            return await super()._open(endpoint, connect_timeout)
        except (OSError, TimeoutError) as exc:  # ssl's errors are OSErrors too
            raise ConnectFailed(f"cannot connect to {endpoint[1]}:{endpoint[2]}: {exc!r}") from exc  # type: ignore[index]
