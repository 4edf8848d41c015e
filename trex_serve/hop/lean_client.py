"""The ingress side of the hop for whole (non-streamed) answers: a small kept-alive HTTP/1.1 client
on an asyncio protocol and httptools' parser. The hop talks to our own pool server only (one
route, Content-Length bodies), so the general client's work per request (its request and response
objects, cookie and redirect logic, a task per body write) bought nothing there; aiohttp's client
was ~12% of an ingress replica's CPU at load (docs/BENCHMARKS.md). Streams keep aiohttp's client.
"""

from __future__ import annotations

import asyncio
import time

import httptools
from multidict import CIMultiDict

# A pool answer is at most MAX_RESPONSE_BYTES (pool_server.py); room for the error envelopes.
MAX_ANSWER_BYTES = 64 * 1024 * 1024


class ReplicaGone(ConnectionError):
    """The replica could not be reached, or closed the connection before a byte of its answer."""


class AnswerCut(Exception):
    """The replica's answer stopped part way (it died, or sent something that is not HTTP)."""


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[None] | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.got_bytes = False
        self.status = 0
        self.keep_alive = False
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
            self._fail(AnswerCut(f"the pool replica's answer is not valid HTTP: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.got_bytes:
            self._fail(AnswerCut("the pool replica closed the connection part way through its answer"))
        else:
            self._fail(ReplicaGone(f"the pool replica closed the connection: {exc or 'EOF'}"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        # Read here: the parser forgets both once the message is complete.
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > MAX_ANSWER_BYTES:
            self._fail(AnswerCut("the pool replica's answer is larger than any answer it may send"))
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    # ours
    def _fail(self, exc: Exception) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)
        self._abort()

    def _abort(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.abort()

    def begin(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        self.headers, self.body, self.size, self.got_bytes = [], [], 0, False
        self.status, self.keep_alive = 0, False
        self.done = loop.create_future()
        return self.done


class LeanClient:
    """POSTs to ``http://host:port/path`` and reads whole answers, reusing idle connections per
    endpoint (newest first) for up to ``idle_s``."""

    def __init__(self, idle_s: float = 30.0) -> None:
        self.idle_s = idle_s
        self._idle: dict[tuple[str, int], list[_Conn]] = {}

    async def post(self, host: str, port: int, path: str, headers: dict[str, str],
                   body: bytes) -> tuple[int, CIMultiDict[str], bytes]:
        endpoint = (host, port)
        lines = [f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value:
                raise ValueError(f"header {name} holds a line break")
            lines.append(f"{name}: {value}\r\n")
        lines.append("\r\n")
        data = "".join(lines).encode() + body
        conn = self._checkout(endpoint)
        if conn is not None:
            try:
                return await self._exchange(endpoint, conn, data)
            except ReplicaGone:
                pass  # closed by the replica while idle, before our request: once on a new connection
        return await self._exchange(endpoint, await self._connect(endpoint), data)

    async def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()

    def _checkout(self, endpoint: tuple[str, int]) -> _Conn | None:
        conns = self._idle.get(endpoint)
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            if not conn.lost and now - conn.idle_since < self.idle_s:
                return conn
            conn._abort()  # noqa: SLF001
        return None

    async def _connect(self, endpoint: tuple[str, int]) -> _Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Conn, *endpoint)
        return conn

    async def _exchange(self, endpoint: tuple[str, int], conn: _Conn,
                        data: bytes) -> tuple[int, CIMultiDict[str], bytes]:
        done = conn.begin(asyncio.get_running_loop())
        assert conn.transport is not None
        try:
            conn.transport.write(data)
            await done
        except BaseException:
            conn._abort()  # noqa: SLF001 - cancelled (deadline) or failed: never reused
            raise
        status = conn.status
        headers = CIMultiDict((n.decode("latin-1"), v.decode("latin-1")) for n, v in conn.headers)
        answer = b"".join(conn.body)
        if conn.keep_alive and not conn.lost:
            conn.idle_since = time.monotonic()
            idle = self._idle.setdefault(endpoint, [])
            # Taken newest first, so after a burst the older ones sit below and the replica closes
            # them: forget those from the oldest end as connections come back.
            while idle and (idle[0].lost or conn.idle_since - idle[0].idle_since >= self.idle_s):
                idle.pop(0)._abort()  # noqa: SLF001
            idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()
        return status, headers, answer
