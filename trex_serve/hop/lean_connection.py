"""One connection of the lean HTTP/1.1 server (lean_server.py): httptools parses what comes in,
requests queue in order and one task answers them in turn, the answers go out through the
transport with its flow control."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import unquote

import httptools
from multidict import CIMultiDict

from trex_serve.hop.lean_messages import Request, Response, StreamResponse, head

if TYPE_CHECKING:
    from trex_serve.hop.lean_server import LeanServer

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
# Pipelined requests parsed ahead of the one being answered before the socket is no longer read.
MAX_QUEUED = 16
# After refusing a body it did not read, the server shuts its side and reads (and drops) what the
# client still sends for a moment: closing with unread bytes resets the connection, and the client
# could lose the answer.
LINGER_S = 2.0


class _Stop(Exception):
    """Raised in a parser callback to stop parsing this connection."""


def _error(status: int) -> Response:
    return Response(status, body=f"{status} {HTTPStatus(status).phrase}".encode(),
                    content_type="text/plain; charset=utf-8")


class Connection(asyncio.Protocol):
    def __init__(self, server: LeanServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Request] = deque()
        self.task: asyncio.Task[None] | None = None
        self.lost = False
        self.closing = False  # after the answer being written
        self.discarding = False  # input is no longer parsed (refused, or a body left unread)
        self.streaming = False  # a streamed answer's head is out: a failure can only cut the connection
        self.client_done = False  # the client shut its side: answer what it sent, then close
        self.last_seen = self.loop.time()
        self._reading_paused = False
        self._writing_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._in_message = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._body: list[bytes] = []
        self._size = 0
        self._request: Request | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else None
        self.server.conns.add(self)
        if self.server.stopping:
            transport.close()

    def data_received(self, data: bytes) -> None:
        self.last_seen = self.loop.time()
        if self.discarding:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _Stop):
                log.error("lean server: a parser callback failed", exc_info=exc.__context__)
                self._refuse(400)
        except httptools.HttpParserUpgrade:
            # No upgrades here: the request is answered in HTTP/1.1, then the connection closes.
            self.discarding = True
            if self.queue:
                self.queue[-1].keep_alive = False
            else:
                self._refuse(400)
        except httptools.HttpParserError:
            self._refuse(400)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server.conns.discard(self)
        self.queue.clear()
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(ConnectionResetError("the client closed the connection"))

    def eof_received(self) -> bool:
        if self.discarding or (self.task is None and not self.queue):
            return False  # asyncio closes the transport
        self.client_done = True  # a client may shut its side after its request: it still waits for the answer
        return True

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._in_message = True
        self._url, self._headers, self._head_size, self._body, self._size = b"", [], 0, [], 0

    def on_url(self, url: bytes) -> None:
        self._url += url  # may come in pieces
        self._grew(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._grew(len(name) + len(value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        headers: CIMultiDict[str] = CIMultiDict(
            (n.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for n, v in self._headers)
        url = self._url
        if url[:1] != b"/":  # absolute form (a proxy's), or nonsense
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                self._refuse(400)
                raise _Stop from None
            url = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
        raw_path, _, query = url.decode("utf-8", "surrogateescape").partition("?")
        path = unquote(raw_path) if "%" in raw_path else raw_path
        http11 = parser.get_http_version() == "1.1"
        request = Request(self, parser.get_method().decode("ascii"), path, query, headers, http11,
                          parser.should_keep_alive())
        self._request = request
        declared = headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > self.server.max_body:
            self._oversize(request)  # refused before a byte of it is read
        if http11 and self.task is None and not self.queue and "Expect" in headers \
                and headers["Expect"].lower() == "100-continue":
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.server.max_body:
            self._oversize(self._request)  # type: ignore[arg-type]
        self._body.append(body)

    def on_message_complete(self) -> None:
        request, self._request, self._in_message = self._request, None, False
        assert request is not None
        body = self._body
        request.body = body[0] if len(body) == 1 else b"".join(body)
        self._enqueue(request)

    # ours
    def _grew(self, n: int) -> None:
        self._head_size += n
        if self._head_size > MAX_HEAD_BYTES:
            self._refuse(431)
            raise _Stop

    def _oversize(self, request: Request) -> None:
        request.oversize = True
        request.keep_alive = False
        self._in_message = False
        self.discarding = True
        self._enqueue(request)
        raise _Stop

    def _refuse(self, status: int) -> None:
        request = Request(self, "", "", "", CIMultiDict(), True, False)
        request.error = status
        self._in_message = False
        self.discarding = True
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        self.queue.append(request)
        if self.task is None:
            self.task = self.loop.create_task(self._serve())
        elif len(self.queue) >= MAX_QUEUED and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    @property
    def idle(self) -> bool:
        return self.task is None and not self.queue and not self._in_message

    def must_close(self, request: Request, force: bool = False) -> bool:
        """Whether the answer to ``request`` is the connection's last (it then says so)."""
        if force or not request.keep_alive or self.server.stopping:
            self.closing = True
        return self.closing

    def send(self, data: bytes) -> None:
        if not self.lost:
            self.transport.write(data)  # type: ignore[union-attr]

    async def drain(self) -> None:
        if self.lost:
            raise ConnectionResetError("the client closed the connection")
        if self._writing_paused:
            if self._drained is None or self._drained.done():
                self._drained = self.loop.create_future()
            await self._drained

    def close(self) -> None:
        transport = self.transport
        if transport is None or self.lost:
            return
        if self.discarding and transport.can_write_eof():
            transport.write_eof()  # the client's close (or the timer) ends it; eof_received closes
            self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()

    async def _serve(self) -> None:
        try:
            while self.queue and not self.lost:
                request = self.queue.popleft()
                if self._reading_paused and len(self.queue) < MAX_QUEUED // 2 and not self.discarding:
                    self._reading_paused = False
                    self.transport.resume_reading()  # type: ignore[union-attr]
                await self._answer(request)
                if self.closing:
                    break
        finally:
            self.task = None
            if self.closing or self.client_done or (self.server.stopping and self.idle):
                self.close()

    async def _answer(self, request: Request) -> None:
        if request.error:
            self.closing = True
            self._whole(request, _error(request.error))
            return
        self.streaming = False
        try:
            response = await self.server.handler(request)
            if isinstance(response, StreamResponse):
                if not response.prepared:
                    await response.prepare(request)
                await response.write_eof()
            else:
                self._whole(request, response)
                await self.drain()
        except Exception as exc:
            if self.lost:
                return  # a write to a client that left: nobody to answer
            if not isinstance(exc, ConnectionError):
                log.exception("lean server: the handler for %s %s failed", request.method, request.path)
            self.closing = True
            if self.streaming:
                self.transport.abort()  # type: ignore[union-attr]  # mid-stream: the client sees it cut
            else:
                self._whole(request, _error(500))

    def _whole(self, request: Request, response: Response) -> None:
        close = self.must_close(request)
        body = response.body
        data = head(response.status, response.headers, f"Content-Length: {len(body)}\r\n", close)
        if request.method == "HEAD":  # the length a GET's body would have, and no body (RFC 9110 9.3.2)
            body = b""
        if len(body) < 16384:
            self.send(data + body)
        else:  # no copy of a large body
            self.send(data)
            self.send(body)
