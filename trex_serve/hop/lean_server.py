"""A small HTTP/1.1 server on an asyncio protocol and httptools' parser, for the two servers on the
request's hot path: the pool replica's hop server and the ingress replica's data server. Both serve
a handful of routes to one known caller (an ingress, the front proxy); aiohttp's server machinery
(its request handler, stream writer, request and response objects, router) was ~10 % of an ingress
replica's CPU and ~15-20 % of a pool replica's at load (docs/BENCHMARKS.md).

What it does: keep-alive, pipelined requests answered in order, bodies read whole up to a limit
(past it the handler still runs, with ``request.oversize``, and the connection closes after its
answer), a whole answer with Content-Length or a stream in chunks with back-pressure, 400 and a
close for what does not parse, 500 and a close when a handler fails, and a graceful stop. It sends
no Server header. In hop/ beside the lean client, below web/ in the import layers, so both servers
can use it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from trex_serve.hop.lean_connection import Connection
from trex_serve.hop.lean_messages import Request, Response, StreamResponse

Handler = Callable[[Request], Awaitable[Response | StreamResponse]]


class LeanServer:
    def __init__(self, handler: Handler, max_body: int, keepalive_s: float = 75.0) -> None:
        self.handler = handler
        self.max_body = max_body
        self.keepalive_s = keepalive_s
        self.conns: set[Connection] = set()
        self.stopping = False
        self.port: int | None = None
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start
        self._server: asyncio.Server | None = None
        self._sweep: asyncio.TimerHandle | None = None

    async def start(self, host: str, port: int = 0) -> int:
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(lambda: Connection(self), host, port, reuse_address=True,
                                                     backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweep = self.loop.call_later(self.keepalive_s / 4, self._close_idle)
        return self.port

    def _close_idle(self) -> None:
        # One timer for the server rather than one per connection and request.
        now = self.loop.time()
        for conn in list(self.conns):
            if conn.idle and now - conn.last_seen > self.keepalive_s:
                conn.close()
        self._sweep = self.loop.call_later(self.keepalive_s / 4, self._close_idle)

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, close idle connections, let the requests in flight finish (each closes
        its connection after its answer) for up to ``timeout``, then cut what is left."""
        if self._server is None:
            return
        self.stopping = True
        if self._sweep is not None:
            self._sweep.cancel()
        self._server.close()
        for conn in list(self.conns):
            if conn.idle:
                conn.close()
        deadline = self.loop.time() + timeout
        while any(c.task is not None for c in self.conns) and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.conns):
            if conn.task is not None:
                conn.task.cancel()
            if conn.transport is not None:
                conn.transport.abort()
        self._server = None
