"""The request and the two kinds of answer of the lean HTTP/1.1 server (lean_server.py): a whole
answer with Content-Length, and a streamed one in chunked transfer encoding. They mirror the small
part of aiohttp's web.Request / web.Response / web.StreamResponse the hop's and the data plane's
handlers used, so those handlers read the same on either server."""

from __future__ import annotations

import time
from collections.abc import Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from multidict import CIMultiDict, MultiDict

if TYPE_CHECKING:
    from trex_serve.hop.lean_connection import Connection

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_date = ["", 0]


def _http_date() -> str:
    # One formatting a second at most: every answer carries Date (RFC 9110 asks an origin for it).
    now = int(time.time())
    if _date[1] != now:
        _date[0] = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
        _date[1] = now
    return _date[0]  # type: ignore[return-value]


def head(status: int, headers: Mapping[str, str], framing: str, close: bool) -> bytes:
    """Status line and header block. ``framing`` is the Content-Length or Transfer-Encoding line."""
    lines = [f"{name}: {value}\r\n" for name, value in headers.items()]
    block = "".join(lines)
    # A CR or LF inside a name or value would let it write headers (or a body) of its own.
    if block.count("\n") != len(lines) or block.count("\r") != len(lines):
        raise ValueError("a response header holds a line break")
    conn = "Connection: close\r\n" if close else ""
    return (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n{framing}{conn}Date: {_http_date()}\r\n"
            f"{block}\r\n").encode()


class Request:
    """One parsed request, its body whole. ``oversize``: the body passed the server's limit and was
    not read (the handler answers 413; the connection closes after that answer)."""

    __slots__ = ("method", "path", "query_string", "headers", "body", "peer", "oversize", "http11",
                 "keep_alive", "error", "_conn", "_query")

    def __init__(self, conn: Connection, method: str, path: str, query_string: str,
                 headers: CIMultiDict[str], http11: bool, keep_alive: bool) -> None:
        self._conn = conn
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers
        self.http11 = http11
        self.keep_alive = keep_alive
        self.body = b""
        self.oversize = False
        self.peer: str | None = conn.peer
        self.error: int = 0  # set by the server for a request it answers itself (400, 431)
        self._query: MultiDict[str] | None = None

    @property
    def query(self) -> MultiDict[str]:
        if self._query is None:
            self._query = MultiDict(parse_qsl(self.query_string, keep_blank_values=True))
        return self._query

    @property
    def disconnected(self) -> bool:
        """The client has gone: nothing written now reaches it."""
        return self._conn.lost


class Response:
    """A whole answer, sent with Content-Length."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int = 200, body: bytes = b"", headers: Mapping[str, str] | None = None,
                 content_type: str | None = None) -> None:
        self.status = status
        self.body = body
        self.headers: dict[str, str] = dict(headers) if headers else {}
        if content_type is not None:
            self.headers["Content-Type"] = content_type


class StreamResponse:
    """A streamed answer: ``prepare`` sends the head, each ``write`` one chunk (after the client has
    taken what was written before, when it is slow), ``write_eof`` the last. Writing to a client that
    went away raises ConnectionResetError."""

    def __init__(self, status: int = 200, headers: Mapping[str, str] | None = None,
                 content_type: str | None = None) -> None:
        self.status = status
        self.headers: dict[str, str] = dict(headers) if headers else {}
        if content_type is not None:
            self.headers["Content-Type"] = content_type
        self.prepared = False
        self.finished = False
        self._conn: Connection | None = None
        self._chunked = True

    async def prepare(self, request: Any) -> None:
        conn: Connection = request._conn  # noqa: SLF001
        self._conn = conn
        self._chunked = request.http11
        # HTTP/1.0 has no chunks: the end of the connection ends the stream.
        close = conn.must_close(request, force=not self._chunked)
        framing = "Transfer-Encoding: chunked\r\n" if self._chunked else ""
        conn.send(head(self.status, self.headers, framing, close))
        self.prepared = True
        conn.streaming = True
        await conn.drain()

    async def write(self, data: bytes) -> None:
        conn = self._conn
        if conn is None or self.finished:
            raise RuntimeError("write before prepare or after write_eof")
        if conn.lost:
            raise ConnectionResetError("the client closed the connection")
        if not data:
            return  # an empty chunk would end the stream
        if self._chunked:
            conn.send(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            conn.send(data)
        await conn.drain()

    async def write_eof(self) -> None:
        if self.finished or self._conn is None:
            return
        self.finished = True
        if self._conn.lost:
            raise ConnectionResetError("the client closed the connection")
        if self._chunked:
            self._conn.send(b"0\r\n\r\n")
        await self._conn.drain()
