"""The Lua plumbing under the counter store: the scripts (loaded from ``lua/``), EVALSHA with
NOSCRIPT recovery, and group commit. The admissions and settlements that coroutines issue in the
same event-loop turn leave in ONE pipeline (one EVALSHA each), each caller getting its own answer,
and a caller may ask to hear when its call has been written to Redis (``sent``), before its reply
arrives. :class:`ScriptCaller` is the base of
:class:`~trex_serve.admission.counters.CounterStore`, which holds the counter API itself."""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from trex_serve.admission.durable_calls import DurableCalls
from trex_serve.admission.lean_redis import LeanRedis
from trex_serve.errors import ServiceUnavailable
from trex_serve.redis_durability import Durability

_LUA_DIR = Path(__file__).resolve().parent / "lua"

_GRANT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('INCRBY', KEYS[1], ARGV[1]) end
return false
"""
_SET_BALANCE_LUA = """
local cur = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1])
return cur
"""
_RENEW_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZADD', KEYS[1], 'XX', 'CH', string.format('%d', ms + tonumber(ARGV[2])), ARGV[1])
"""


class _Script:
    __slots__ = ("name", "body", "sha")

    def __init__(self, name: str, body: str) -> None:
        self.name = name
        self.body = body
        self.sha = hashlib.sha1(body.encode()).hexdigest()


def _load_scripts() -> dict[str, _Script]:
    common = (_LUA_DIR / "_common.lua").read_text()
    return {
        "admit": _Script("admit", common + "\n" + (_LUA_DIR / "admit.lua").read_text()),
        "settle": _Script("settle", common + "\n" + (_LUA_DIR / "settle.lua").read_text()),
        "hit": _Script("hit", common + "\n" + (_LUA_DIR / "hit.lua").read_text()),
        "auth": _Script("auth", (_LUA_DIR / "auth_fail.lua").read_text()),
        "grant": _Script("grant", _GRANT_LUA),
        "set_balance": _Script("set_balance", _SET_BALANCE_LUA),
        "renew": _Script("renew", _RENEW_LUA),
    }


_SCRIPTS = _load_scripts()


def _opt(value: int | None) -> int:
    """None (no limit) -> -1 for the scripts."""
    return -1 if value is None else int(value)


def _now_arg(now: float | None) -> str:
    return "" if now is None else repr(float(now))


def _unavailable(exc: BaseException) -> ServiceUnavailable:
    err = ServiceUnavailable(
        f"counter store unavailable: {type(exc).__name__}: {exc}",
        code="counter_store_unavailable",
        retry_after=1,
    )
    err.__cause__ = exc
    return err


# ---------------------------------------------------------------------------------------------
# group commit


class _Batcher:
    """Collects the script calls issued during one event-loop turn and writes them as one pipeline
    at the end of the turn (a callback queued behind everything already ready in this turn takes
    all that was queued by then). A call made while nothing is in flight has nothing to wait for
    and is written at once: at one request at a time that saves a turn of the loop twice per
    request. Writes are not serialised: a new turn's batch leaves while earlier ones are still
    unanswered (one lean connection answers in order; redis-py's pool uses another connection).
    The rare cases (no open connection yet, a dropped socket, NOSCRIPT) go the async way."""

    def __init__(self, store: ScriptCaller, max_batch: int) -> None:
        self._store = store
        self._max_batch = max_batch
        self._pending: list[_Item] = []
        self._scheduled = False
        self._unanswered = 0  # calls written on the lean connection whose replies are still out
        self._tasks: set[asyncio.Task] = set()

    def submit(self, script: _Script, args: list[Any], sent: asyncio.Future | None = None) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((script, args, fut, sent))
        if not self._scheduled:
            self._scheduled = True
            if self._unanswered == 0 and self._store._can_write_now():
                self._flush()
            else:
                loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        for item in batch:
            if item[2].done():  # given up before it left (its timeout): never sent
                _mark_sent(item[3], None)
        batch = [item for item in batch if not item[2].done()]
        for i in range(0, len(batch), self._max_batch):
            chunk = batch[i : i + self._max_batch]
            handlers = [functools.partial(self._deliver, item) for item in chunk]
            try:
                written = self._store._write_now([(s, a) for s, a, _, _ in chunk], handlers)
            except (RedisError, OSError, RuntimeError):  # the socket failed under the write
                written = False
            if not written:
                self._spawn(self._send(chunk))  # no open lean connection (or redis-py's pool)
                continue
            self._unanswered += len(chunk)
            for item in chunk:
                _mark_sent(item[3], None)

    def _deliver(self, item: _Item, result: Any, lost: BaseException | None) -> None:
        self._unanswered -= 1
        fut = item[2]
        if fut.done():
            return
        if lost is not None or isinstance(_no_script(result), NoScriptError):
            # A dropped socket or NOSCRIPT: the async path connects, loads, and sends again (the
            # scripts are idempotent by request id, so one that did run is not applied twice).
            self._spawn(self._send([item]))
        elif isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Item]) -> None:
        live = [item for item in batch if not item[2].done()]
        if not live:
            for item in batch:
                _mark_sent(item[3], None)
            return
        try:
            results = await self._store._roundtrip([(s, a) for s, a, _, _ in live],
                                                   lambda: [_mark_sent(i[3], None) for i in live])
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter
            for _, _, fut, sent in live:
                _mark_sent(sent, exc)
                if not fut.done():
                    fut.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (_, _, fut, _), result in zip(live, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)


_Item = tuple[_Script, list[Any], asyncio.Future, "asyncio.Future | None"]


def _no_script(reply: Any) -> Any:
    """The lean connection's error replies are plain ``ResponseError``s; NOSCRIPT gets its class."""
    if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
        return NoScriptError(str(reply))
    return reply


def _evalshas(calls: list[tuple[_Script, list[Any]]]) -> list[tuple[Any, ...]]:
    return [("EVALSHA", s.sha, 0, *a) for s, a in calls]


def _mark_sent(sent: asyncio.Future | None, exc: BaseException | None) -> None:
    if sent is not None and not sent.done():
        if exc is None:
            sent.set_result(None)
        else:
            sent.set_exception(exc)
            sent.exception()  # read here: a waiter that already left must not log it as unretrieved


# ---------------------------------------------------------------------------------------------
# script calls


class ScriptCaller(DurableCalls):
    """Runs the counter scripts on ``client``: batched (group commit) or direct, bounded by
    ``timeout_s``, every Redis failure turned into ``counter_store_unavailable``."""

    def __init__(
        self, client: aioredis.Redis, *, group_commit: bool, max_batch: int, timeout_s: float,
        lean: bool = True, durability: Durability | None = None,
    ) -> None:
        """``lean``: the script calls go over :class:`LeanRedis` (when the URL allows it), not
        redis-py's pool. ``durability``: every batch waits for replicas (redis_durability.py)."""
        self.client = client
        self.durability = durability
        self.group_commit = group_commit
        self.timeout_s = timeout_s
        self._batcher = _Batcher(self, max_batch)
        self._lean = LeanRedis.for_client(client) if lean else None

    async def load_scripts(self) -> None:
        """SCRIPT LOAD every script (optional: NOSCRIPT is handled on first use anyway)."""
        try:
            for script in _SCRIPTS.values():
                await self.client.script_load(script.body)
        except RedisError as exc:
            raise _unavailable(exc) from exc

    async def _evalsha_direct(self, script: _Script, args: list[Any], keys: Sequence[str] = ()) -> Any:
        try:
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.client.script_load(script.body)
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)

    async def _roundtrip(self, calls: list[tuple[_Script, list[Any]]],
                         on_sent: Callable[[], Any] = lambda: None) -> list[Any]:
        """EVALSHA each call in one write (the lean connection, or one of redis-py's pooled ones)
        and read the replies in order (an error reply is returned in its place). ``on_sent`` runs
        once the write is done, before any reply: what was written reaches Redis ahead of anything
        the process sends after.
        A NOSCRIPT reply (Redis restarted, SCRIPT FLUSH) means that call did not run: the script is
        loaded and the call redone. A dropped connection is retried once on a fresh one;
        the scripts are idempotent by request id, so a call that did run is not applied twice."""
        results = await self._on_connection(calls, on_sent)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            for script in {calls[i][0].name: calls[i][0] for i in missing}.values():
                await self._load(script)
            redo = await self._on_connection([calls[i] for i in missing])
            for i, r in zip(missing, redo, strict=True):
                results[i] = r
        return results

    @property
    def lean(self) -> LeanRedis | None:
        """The lean connection the scripts go over (None: redis-py's pool), for other hot writes."""
        return self._lean

    def _can_write_now(self) -> bool:
        return self._lean is not None and self._lean.ready() is not None

    def _write_now(self, calls: list[tuple[_Script, list[Any]]], handlers: list[Any]) -> bool:
        """Write the calls on the open lean connection, synchronously; False when there is none."""
        if self._lean is None:
            return False
        commands: list[Any] = _evalshas(calls)
        if self.durability is not None:  # one WAIT after the batch; replies held until it answers
            commands, handlers = self.durability.guard(commands, handlers)
        return self._lean.send_now(commands, handlers)

    def _acknowledged(self, replies: list[Any]) -> list[Any]:
        """Replies of a batch written with a trailing WAIT (durable mode) -> the batch's results."""
        return replies if self.durability is None else self.durability.results(replies)

    async def _load(self, script: _Script) -> None:
        if self._lean is None:
            await self.client.script_load(script.body)
            return
        (reply,) = await self._lean.execute([("SCRIPT", "LOAD", script.body)])
        if isinstance(reply, BaseException):
            raise reply

    async def _on_connection(self, calls: list[tuple[_Script, list[Any]]],
                             on_sent: Callable[[], Any] = lambda: None) -> list[Any]:
        commands: list[Any] = _evalshas(calls)
        if self.durability is not None:
            commands.append(self.durability.command())
        if self._lean is not None:
            try:
                results = await self._lean.execute(commands, on_sent)
            except RedisConnectionError:  # a socket the server dropped while idle: once more, fresh
                results = await self._lean.execute(commands, on_sent)
            return [_no_script(r) for r in self._acknowledged(results)]
        pool = self.client.connection_pool
        for attempt in (1, 2):
            conn = await pool.get_connection()
            try:
                await conn.send_packed_command(conn.pack_commands(commands))
                on_sent()
                results: list[Any] = []
                for _ in commands:
                    try:
                        results.append(await conn.read_response())
                    except ResponseError as exc:
                        results.append(exc)
                return self._acknowledged(results)
            except (RedisConnectionError, OSError):
                await conn.disconnect()
                if attempt == 2:
                    raise
            except BaseException:
                await conn.disconnect()  # replies left unread: the connection is out of step
                raise
            finally:
                await pool.release(conn)
        raise AssertionError("unreachable")

    async def _call(self, name: str, args: list[Any], *, batch: bool = True,
                    sent: asyncio.Future | None = None) -> Any:
        """``sent`` (optional) is resolved once the call has been written to Redis, or gets the
        error when it could not be."""
        script = _SCRIPTS[name]
        try:
            if self.durability is None:
                async with asyncio.timeout(self.timeout_s):
                    result = await self._once(script, args, batch, sent)
            else:  # ``sent`` only once replicas hold the call: the answer must not leave before
                result = await self._replicated(script, args, batch, self.durability)
        except BaseException as exc:
            _mark_sent(sent, exc)
            if isinstance(exc, (RedisError, OSError, TimeoutError)):
                raise _unavailable(exc) from exc
            raise
        if isinstance(result, BaseException):
            _mark_sent(sent, result)
            if isinstance(result, (RedisError, OSError)):
                raise _unavailable(result) from result
            raise result
        _mark_sent(sent, None)
        return result

    async def _call_unacknowledged(self, name: str, args: list[Any]) -> Any:
        """One attempt, bounded by ``timeout_s``, whatever the replicas acknowledge: for a write
        whose loss costs only a wait. Redis errors are raised as they are."""
        async with asyncio.timeout(self.timeout_s):
            return await self._once(_SCRIPTS[name], args, True, None)

    async def _once(self, script: _Script, args: list[Any], batch: bool, sent: asyncio.Future | None) -> Any:
        if batch and self.group_commit:
            return await self._batcher.submit(script, args, sent)
        return (await self._roundtrip([(script, args)], lambda: _mark_sent(sent, None)))[0]

    async def _cmd(self, coro: Awaitable[Any]) -> Any:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await coro
        except (RedisError, OSError, TimeoutError) as exc:
            raise _unavailable(exc) from exc

    async def _evalsha_keys(self, name: str, keys: list[str], args: list[Any]) -> Any:
        if self.durability is None or name == "renew":
            return await self._evalsha_direct(_SCRIPTS[name], args, keys)
        return await self._evalsha_acknowledged(_SCRIPTS[name], args, keys, self.durability)
