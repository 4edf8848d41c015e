"""The Lua plumbing under the counter store: the scripts (loaded from ``lua/``), EVALSHA with
NOSCRIPT recovery, and group commit. The admissions and settlements that coroutines issue in the
same event-loop turn leave in ONE pipeline (one EVALSHA each, ``transaction=False``), each caller
getting its own answer. :class:`ScriptCaller` is the base of
:class:`~trex_serve.admission.counters.CounterStore`, which holds the counter API itself."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from trex_serve.errors import ServiceUnavailable

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
    """Collects the script calls issued during one event-loop turn and sends them as one pipeline
    at the end of the turn: the first call of a turn creates the sending task, whose first step
    runs after every callback already ready in this turn, and takes everything queued by then.
    Pipelines are not serialised: a new turn's batch leaves while the previous one is still in
    flight, on another pooled connection."""

    def __init__(self, store: ScriptCaller, max_batch: int) -> None:
        self._store = store
        self._max_batch = max_batch
        self._pending: list[tuple[_Script, list[Any], asyncio.Future]] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task] = set()

    def submit(self, script: _Script, args: list[Any]) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((script, args, fut))
        if not self._scheduled:
            self._scheduled = True
            task = loop.create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return fut

    async def _flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        if len(batch) <= self._max_batch:
            await self._send(batch)
            return
        chunks = [batch[i : i + self._max_batch] for i in range(0, len(batch), self._max_batch)]
        await asyncio.gather(*[self._send(c) for c in chunks], return_exceptions=True)

    async def _send(self, batch: list[tuple[_Script, list[Any], asyncio.Future]]) -> None:
        live = [item for item in batch if not item[2].done()]
        if not live:
            return
        try:
            if len(live) == 1:  # a batch of one: a plain EVALSHA is cheaper than a pipeline
                script, args, _ = live[0]
                results = [await self._store._evalsha_direct(script, args)]
            else:
                results = await self._store._pipeline_eval([(s, a) for s, a, _ in live])
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter
            for _, _, fut in live:
                if not fut.done():
                    fut.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (_, _, fut), result in zip(live, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)


# ---------------------------------------------------------------------------------------------
# script calls


class ScriptCaller:
    """Runs the counter scripts on ``client``: batched (group commit) or direct, bounded by
    ``timeout_s``, every Redis failure turned into ``counter_store_unavailable``."""

    def __init__(
        self, client: aioredis.Redis, *, group_commit: bool, max_batch: int, timeout_s: float
    ) -> None:
        self.client = client
        self.group_commit = group_commit
        self.timeout_s = timeout_s
        self._batcher = _Batcher(self, max_batch)

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

    async def _pipeline_eval(self, calls: list[tuple[_Script, list[Any]]]) -> list[Any]:
        async def run(items: list[tuple[_Script, list[Any]]]) -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for script, args in items:
                pipe.execute_command("EVALSHA", script.sha, 0, *args)
            return await pipe.execute(raise_on_error=False)

        results = await run(calls)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            # Redis restarted or SCRIPT FLUSH: the calls that hit NOSCRIPT did not run; load and redo.
            for script in {calls[i][0].name: calls[i][0] for i in missing}.values():
                await self.client.script_load(script.body)
            redo = await run([calls[i] for i in missing])
            for i, r in zip(missing, redo, strict=True):
                results[i] = r
        return results

    async def _call(self, name: str, args: list[Any], *, batch: bool = True) -> Any:
        script = _SCRIPTS[name]
        try:
            async with asyncio.timeout(self.timeout_s):
                if batch and self.group_commit:
                    result = await self._batcher.submit(script, args)
                else:
                    result = await self._evalsha_direct(script, args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise _unavailable(exc) from exc
        if isinstance(result, BaseException):
            if isinstance(result, (RedisError, OSError)):
                raise _unavailable(result) from result
            raise result
        return result

    async def _cmd(self, coro: Awaitable[Any]) -> Any:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await coro
        except (RedisError, OSError, TimeoutError) as exc:
            raise _unavailable(exc) from exc

    async def _evalsha_keys(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self._evalsha_direct(_SCRIPTS[name], args, keys)
