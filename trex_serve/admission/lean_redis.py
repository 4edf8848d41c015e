"""A lean, multiplexed Redis connection for the counter scripts (admission, settlement, the
failed-auth throttle): one socket per process, commands written the moment they are handed over,
replies matched to callers in the order Redis sends them (RESP is in order per connection), parsed
by hiredis. redis-py's pooled path spent ~75 µs of Python before the bytes of one script call left
(pool lock and bookkeeping, health checks, a stream reader, a timeout per read): on the hot path
twice per request (docs/BENCHMARKS.md). Every other Redis command stays on redis-py.

Plain TCP and Unix-socket URLs only (``redis://``, ``unix://``, with a user, a password and a
database), and a Sentinel-managed primary (``redis+sentinel://``, redis_urls.py): the address is
asked of the sentinels on every (re)connection and the server must say it is the primary. Anything
else (TLS) makes :meth:`LeanRedis.for_client` answer None and the caller keeps redis-py's path.
A ``READONLY`` error reply means the server was demoted under us: the connection is dropped, so
every call on it fails as on a lost socket and is sent again on a fresh connection.

A deposed primary does not always say so: when the sentinels promote a replica while the old
primary is still up (a partition between it and the sentinels, or a second failover that deposes a
primary promoted a moment before), the old one keeps answering as a primary until the sentinels
reach it and make it a replica, which can take many seconds or the whole partition. Everything
written to it meanwhile is lost when it is made a replica. So the sentinels are asked again every
``recheck_s`` while calls flow (in the background: the hot path does not wait for them), and before
the first call after an idle spell; a socket to a server they no longer name is dropped."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.asyncio.sentinel import SentinelConnectionPool, SentinelManagedConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError


def pack(args: Sequence[Any]) -> bytes:
    """One command in RESP: an array of bulk strings (str, bytes, int and float arguments).
    hiredis's encoder in C where it takes the arguments (half the time of the loop below)."""
    try:
        return hiredis.pack_command(tuple(args))
    except TypeError:  # a type hiredis does not encode: written as its str()
        return _pack(args)


def _pack(args: Sequence[Any]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


Handler = Callable[[Any, BaseException | None], None]  # (reply, None) or (None, connection error)


def _resolve(fut: asyncio.Future, reply: Any, err: BaseException | None) -> None:
    if fut.done():  # a caller that gave up (its timeout) still had its reply in line
        return
    if err is not None:
        fut.set_exception(err)
    else:
        fut.set_result(reply)


class _Resp(asyncio.Protocol):
    def __init__(self, encoding: str | None) -> None:
        kwargs: dict[str, Any] = {"replyError": ResponseError}
        if encoding:
            kwargs["encoding"] = encoding
        self._reader = hiredis.Reader(**kwargs)
        self._waiting: deque[Handler] = deque()  # one per reply still due, in the order sent
        self._transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:  # out of step with the server: nothing read is trustworthy
                self._fail(RedisConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if isinstance(reply, ResponseError) and str(reply).startswith("READONLY"):
                # A demoted primary (failover): nothing on this socket can be written any more.
                self._fail(RedisConnectionError(f"Redis server is now a replica: {reply}"))
                return
            self._waiting.popleft()(reply, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"Redis connection lost: {exc or 'closed by the server'}"))

    def _fail(self, err: Exception) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()
        while self._waiting:
            self._waiting.popleft()(None, err)

    def send(self, payload: bytes, handlers: Sequence[Handler]) -> None:
        """Write ``payload`` (one command per handler); each handler is called with its reply, or
        with the error that lost the connection, as soon as it is read."""
        if self.closed or self._transport is None:
            raise RedisConnectionError("Redis connection closed")
        self._transport.write(payload)  # first: a write that raises leaves no handler waiting
        self._waiting.extend(handlers)

    def send_awaitable(self, payload: bytes, replies: int) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in range(replies)]
        self.send(payload, [functools.partial(_resolve, f) for f in futs])
        return futs

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()


class LeanRedis:
    def __init__(self, *, host: str = "127.0.0.1", port: int = 6379, path: str | None = None, db: int = 0,
                 username: str | None = None, password: str | None = None, encoding: str | None = "utf-8",
                 connect_timeout_s: float = 2.0, resolve: Callable[[], Awaitable[tuple[str, int]]] | None = None,
                 recheck_s: float = 1.0) -> None:
        """``resolve``: asked for (host, port) on every connection (a Sentinel-managed primary), and
        again every ``recheck_s`` while the connection is in use."""
        self.host, self.port, self.path, self.db = host, port, path, int(db or 0)
        self.resolve = resolve
        self.recheck_s = recheck_s
        self._checked_at = 0.0  # monotonic time of the sentinels' last answer about the primary
        self._checking: asyncio.Task | None = None
        self.username, self.password = username, password
        self.encoding = encoding
        self.connect_timeout_s = connect_timeout_s
        self._conn: _Resp | None = None
        self._connecting: asyncio.Task | None = None

    @classmethod
    def for_client(cls, client: aioredis.Redis) -> LeanRedis | None:
        """The same server, database and credentials as ``client`` (a redis-py client made from a
        URL), or None when its connections are of a kind this class does not speak (TLS)."""
        pool = client.connection_pool
        kw = pool.connection_kwargs
        common = {"db": kw.get("db", 0), "username": kw.get("username"), "password": kw.get("password"),
                  "encoding": kw.get("encoding", "utf-8") if kw.get("decode_responses") else None,
                  "connect_timeout_s": kw.get("socket_connect_timeout") or 2.0}
        if pool.connection_class is Connection:
            return cls(host=kw.get("host", "localhost"), port=int(kw.get("port", 6379)), **common)
        if isinstance(pool, SentinelConnectionPool) and pool.connection_class is SentinelManagedConnection:
            return cls(resolve=pool.get_master_address, **common)
        if pool.connection_class is UnixDomainSocketConnection:
            return cls(path=kw["path"], **common)
        return None

    async def _connection(self) -> _Resp:
        if self._conn is not None and not self._conn.closed:
            if self.resolve is None or not self._stale():
                self._recheck_soon()
                return self._conn
            await self._recheck()  # idle for a while: the primary may have changed meanwhile
            if self._conn is not None and not self._conn.closed:
                return self._conn
        if self._connecting is None:  # one connect for every caller that finds the socket down
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        task = self._connecting
        try:
            return await asyncio.shield(task)
        finally:
            if task.done() and self._connecting is task:
                self._connecting = None

    async def _connect(self) -> _Resp:
        loop = asyncio.get_running_loop()
        proto = _Resp(self.encoding)
        async with asyncio.timeout(self.connect_timeout_s):
            if self.resolve is not None:  # raises a ConnectionError while no primary is known
                self.host, self.port = await self.resolve()
                self._checked_at = time.monotonic()
            try:
                if self.path is not None:
                    await loop.create_unix_connection(lambda: proto, self.path)
                else:
                    await loop.create_connection(lambda: proto, self.host, self.port)
            except OSError as exc:
                raise RedisConnectionError(f"cannot connect to Redis: {exc}") from exc
            hello: list[list[Any]] = []
            if self.password:
                hello.append(["AUTH", self.username, self.password] if self.username else ["AUTH", self.password])
            if self.db:
                hello.append(["SELECT", self.db])
            if self.resolve is not None:  # the sentinels' answer may be a moment behind a failover
                hello.append(["ROLE"])
            if hello:
                replies = await asyncio.gather(*proto.send_awaitable(b"".join(pack(c) for c in hello), len(hello)))
                for reply in replies:
                    if isinstance(reply, ResponseError):
                        proto.close()
                        raise reply
                role = replies[-1][0] if self.resolve is not None else "master"
                if role not in ("master", b"master"):
                    proto.close()
                    raise RedisConnectionError(f"{self.host}:{self.port} is not the primary ({role!r})")
        self._conn = proto
        return proto

    def ready(self) -> _Resp | None:
        """The open connection, when there is one: a write on it needs no await. None too when the
        sentinels were last asked about the primary too long ago (:meth:`execute` asks first)."""
        conn = self._conn
        if conn is None or conn.closed:
            return None
        if self.resolve is not None:
            if self._stale():
                return None
            self._recheck_soon()
        return conn

    # -- following the sentinels while connected ------------------------------------------------

    def _stale(self) -> bool:
        """No word from the sentinels for two rechecks: the calls have been idle."""
        return time.monotonic() - self._checked_at > 2 * self.recheck_s

    def _recheck_soon(self) -> None:
        """Ask the sentinels in the background once ``recheck_s`` has passed since they last were."""
        if self.resolve is None or self._checking is not None:
            return
        if time.monotonic() - self._checked_at <= self.recheck_s:
            return
        with contextlib.suppress(RuntimeError):  # no running loop: the next call in one asks
            self._checking = asyncio.get_running_loop().create_task(self._ask_sentinels())

    async def _recheck(self) -> None:
        if self._checking is None:
            self._checking = asyncio.get_running_loop().create_task(self._ask_sentinels())
        await asyncio.shield(self._checking)

    async def _ask_sentinels(self) -> None:
        assert self.resolve is not None
        conn = self._conn
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                host, port = await self.resolve()
        except Exception:  # noqa: BLE001 - no primary known right now: the socket's own errors will tell
            return
        finally:
            self._checked_at = time.monotonic()
            self._checking = None
        if (host, int(port)) != (self.host, int(self.port)) and conn is not None and conn is self._conn:
            # Every call on it fails as on a lost socket and is sent again on a fresh connection
            # (the scripts are idempotent by request id).
            conn._fail(RedisConnectionError(
                f"{self.host}:{self.port} is no longer the primary: the sentinels name {host}:{port}"))

    def send_now(self, commands: Sequence[Sequence[Any]], handlers: Sequence[Handler]) -> bool:
        """Write ``commands`` at once on the open connection, each reply going to its handler (an
        error reply as a ``ResponseError``, a lost connection as the handler's error); False when
        no connection is open (then :meth:`execute` connects)."""
        conn = self.ready()
        if conn is None:
            return False
        conn.send(b"".join(pack(c) for c in commands), handlers)
        return True

    async def execute(self, commands: Sequence[Sequence[Any]], on_sent: Any = None) -> list[Any]:
        """Write ``commands`` in one go and return their replies in order (an error reply in its
        place, as a ``ResponseError``). ``on_sent()`` runs right after the write."""
        conn = await self._connection()
        futs = conn.send_awaitable(b"".join(pack(c) for c in commands), len(commands))
        if on_sent is not None:
            on_sent()
        return [await f for f in futs]

    def close(self) -> None:
        if self._checking is not None:
            with contextlib.suppress(RuntimeError):  # its loop already closed: nothing left to stop
                self._checking.cancel()
            self._checking = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
