"""A small kept-alive HTTP/1.1 client on an asyncio protocol and httptools' parser, for whole
(non-streamed) answers. The ingress reads the hop's answers with it (``LeanClient``: our own pool
server, one route, Content-Length bodies) and a pool replica its upstreams' (upstream_client.py).
The general client's work per request (its request and response objects, cookie and redirect
logic, a task per body write) bought nothing there: aiohttp's client was ~12% of an ingress
replica's CPU at load and ~20% of a pool replica's (docs/BENCHMARKS.md). Streams keep aiohttp's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable, Mapping
from typing import Any

import httptools
from multidict import CIMultiDict

# A pool answer is at most MAX_RESPONSE_BYTES (pool_server.py); room for the error envelopes.
MAX_ANSWER_BYTES = 64 * 1024 * 1024


class ReplicaGone(ConnectionError):
    """The server could not be reached, or closed the connection before a byte of its answer."""


class AnswerCut(Exception):
    """The answer stopped part way (the server died, or sent something that is not HTTP)."""


class AnswerTooLarge(AnswerCut):
    """The answer's body is longer than the connection's limit: read no further, never reuse."""


class _Conn(asyncio.Protocol):
    def __init__(self, limit: int = MAX_ANSWER_BYTES) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.limit = limit
        self.done: asyncio.Future[None] | None = None
        self.head: asyncio.Future[None] | None = None  # only when the caller awaits the head alone
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.got_bytes = False
        self.status = 0
        self.keep_alive = False
        self.until_eof = False
        self.lost = False
        self.idle_since = 0.0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.done is None or self.done.done():
            self._abort()  # bytes nobody asked for: this connection cannot be trusted again
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(AnswerCut(f"the answer is not valid HTTP: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return  # we dropped it (a deadline, a failure, an answer nobody reads): nobody waits on it
        self.lost = True
        if self.until_eof and exc is None and self.done is not None and not self.done.done():
            self.done.set_result(None)  # an answer with neither length nor chunks ends at the close
        elif self.got_bytes:
            self._fail(AnswerCut("the server closed the connection part way through its answer"))
        else:
            self._fail(ReplicaGone(f"the server closed the connection: {exc or 'EOF'}"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        # Read here: the parser forgets both once the message is complete.
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        if not self.keep_alive:
            # httptools cannot be told of the EOF (no llhttp_finish): whether the close ends the
            # body or cuts it is read from the head, as llhttp would.
            names = {n.lower() for n, _ in self.headers}
            self.until_eof = (b"content-length" not in names and b"transfer-encoding" not in names
                              and self.status >= 200 and self.status not in (204, 304))
        if self.head is not None and not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.limit:
            self._fail(AnswerTooLarge(f"the answer is larger than {self.limit} bytes"))
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.until_eof = False
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    # ours
    def _fail(self, exc: Exception) -> None:
        if self.head is not None and not self.head.done():
            self.head.set_exception(exc)
            if self.done is not None:
                self.done.cancel()  # its waiter, if any, is the head's: nobody reads this one
        elif self.done is not None and not self.done.done():
            self.done.set_exception(exc)
        self._abort()

    def _abort(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.abort()

    def begin(self, loop: asyncio.AbstractEventLoop, head: bool, limit: int) -> asyncio.Future[None]:
        self.headers, self.body, self.size, self.got_bytes, self.limit = [], [], 0, False, limit
        self.status, self.keep_alive, self.until_eof = 0, False, False
        self.done = loop.create_future()
        self.head = loop.create_future() if head else None
        return self.head or self.done


def request_bytes(target: str, host: str, headers: Mapping[str, str], body: bytes) -> bytes:
    """A POST with a Content-Length body and exactly ``headers`` besides Host and the length."""
    lines = [f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} holds a line break")
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode() + body


class LeanClient:
    """POSTs to ``http://host:port/path`` and reads whole answers, reusing idle connections per
    endpoint (newest first) for up to ``idle_s``. Subclasses open other kinds of endpoint."""

    def __init__(self, idle_s: float = 30.0, limit: int = MAX_ANSWER_BYTES) -> None:
        self.idle_s = idle_s
        self.limit = limit
        self._idle: dict[Hashable, list[_Conn]] = {}

    async def post(self, host: str, port: int, path: str, headers: dict[str, str],
                   body: bytes) -> tuple[int, CIMultiDict[str], bytes]:
        endpoint = (host, port)
        conn = await self._send(endpoint, request_bytes(path, f"{host}:{port}", headers, body), head=False)
        return self._finish(endpoint, conn)

    async def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()

    def _address(self, endpoint: Hashable) -> tuple[str, int, dict[str, Any]]:
        """Host, port and create_connection's other arguments (TLS) for an endpoint key."""
        host, port = endpoint  # type: ignore[misc]
        return host, port, {}

    async def _open(self, endpoint: Hashable, connect_timeout: float | None = None) -> _Conn:
        host, port, extra = self._address(endpoint)
        async with asyncio.timeout(connect_timeout):
            _, conn = await asyncio.get_running_loop().create_connection(
                lambda: _Conn(self.limit), host, port, **extra)
        return conn

    async def _send(self, endpoint: Hashable, data: bytes, head: bool,
                    connect_timeout: float | None = None, limit: int | None = None) -> _Conn:
        """Writes the request and waits for the answer's head (``head``) or all of it; a body
        past ``limit`` (default: the client's) fails the answer with AnswerTooLarge."""
        limit = limit or self.limit
        conn = self._checkout(endpoint)
        if conn is not None:
            try:
                await self._exchange(conn, data, head, limit)
                return conn
            except ReplicaGone:
                pass  # closed by the server while idle, before our request: once on a new connection
        conn = await self._open(endpoint, connect_timeout)
        await self._exchange(conn, data, head, limit)
        return conn

    @staticmethod
    async def _exchange(conn: _Conn, data: bytes, head: bool, limit: int) -> None:
        waiter = conn.begin(asyncio.get_running_loop(), head, limit)
        assert conn.transport is not None
        try:
            conn.transport.write(data)
            await waiter
        except BaseException:
            conn._abort()  # noqa: SLF001 - cancelled (deadline) or failed: never reused
            raise

    def _finish(self, endpoint: Hashable, conn: _Conn) -> tuple[int, CIMultiDict[str], bytes]:
        """The complete answer; its connection goes back to the idle stack if it may be reused."""
        headers = CIMultiDict((n.decode("latin-1"), v.decode("latin-1")) for n, v in conn.headers)
        answer = b"".join(conn.body)
        self._checkin(endpoint, conn)
        return conn.status, headers, answer

    def _checkout(self, endpoint: Hashable) -> _Conn | None:
        conns = self._idle.get(endpoint)
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            if not conn.lost and now - conn.idle_since < self.idle_s:
                return conn
            conn._abort()  # noqa: SLF001
        return None

    def _checkin(self, endpoint: Hashable, conn: _Conn) -> None:
        complete = conn.done is not None and conn.done.done() and not conn.done.cancelled() \
            and conn.done.exception() is None
        if not (complete and conn.keep_alive and not conn.lost):
            if complete and conn.transport is not None:
                conn.transport.close()
            else:
                conn._abort()  # noqa: SLF001 - part of an answer may still come: never reused
            return
        conn.idle_since = time.monotonic()
        idle = self._idle.setdefault(endpoint, [])
        # Taken newest first, so after a burst the older ones sit below and the server closes
        # them: forget those from the oldest end as connections come back.
        while idle and (idle[0].lost or conn.idle_since - idle[0].idle_since >= self.idle_s):
            idle.pop(0)._abort()  # noqa: SLF001
        idle.append(conn)
