"""The counter store shared by every replica: rate windows, concurrency leases, daily quota, credit
reservations, spend caps, velocity and the failed-auth throttle, kept in Redis.

Exactness comes from Lua: one atomic script per admission (``lua/admit.lua``) and one per
settlement (``lua/settle.lua``), both built on ``lua/_common.lua``. Throughput comes from group
commit: the admissions and settlements that coroutines issue in the same event-loop turn leave in
ONE pipeline (one EVALSHA each, ``transaction=False``), each caller getting its own answer.

An admission writes a small record (``{prefix}req:{request_id}``) that its settlement consumes: the
settlement needs only the request id and the actual usage, a second settlement finds no record and
does nothing (never double-charged), and a retried admission returns its first answer. Leases of
a replica that died expire and are reaped by the key's next admission, which settles them as
failed so their reservations come back. Long streams call :meth:`CounterStore.renew_lease`.

Periods (60-s window, UTC day, calendar month) come from the Redis server's clock unless a request
passes ``now`` (tests, replays). Every Redis failure surfaces as
``ServiceUnavailable(code="counter_store_unavailable")``: the gateway fails closed with 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import NoScriptError, RedisError

from trex_serve.admission.counter_records import (
    AdmitRequest,
    AdmitResult,
    SettleRequest,
    SettleResult,
    _parse_admit,
    _parse_settle,
    _s,
)
from trex_serve.errors import ServiceUnavailable

log = logging.getLogger(__name__)

_LUA_DIR = Path(__file__).resolve().parent / "lua"


# admission codes (the gateway maps them onto CONTRACT.md section 2)
RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
CONCURRENCY_LIMIT_EXCEEDED = "concurrency_limit_exceeded"
INSUFFICIENT_QUOTA = "insufficient_quota"
INSUFFICIENT_CREDITS = "insufficient_credits"
SPEND_LIMIT_EXCEEDED = "spend_limit_exceeded"
BALANCE_MISSING = "balance_missing"

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

    def __init__(self, store: CounterStore, max_batch: int) -> None:
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
# the store


class _ResyncPubSub(PubSub):
    """redis-py reconnects a pubsub connection by itself and re-subscribes in ``on_connect``;
    flag every (re)connection, silent ones included, so the subscriber announces a resync."""

    resync = True  # the first subscription is a resync too

    async def on_connect(self, connection: Any) -> None:
        await super().on_connect(connection)
        self.resync = True


class CounterStore:
    """Shared counters in Redis. ``client`` is a ``redis.asyncio.Redis`` (decoded or not);
    ``prefix`` namespaces every key (``"trex:"`` by default; tests pass a unique one)."""

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str = "trex:",
        *,
        group_commit: bool = True,
        max_batch: int = 512,
        timeout_s: float = 5.0,
        record_ttl_s: int = 7 * 86400,
    ) -> None:
        self.client = client
        self.prefix = prefix
        # Set when shutting down: background loops end on it even if redis-py swallows a cancellation.
        self.closing = False
        self.group_commit = group_commit
        self.timeout_s = timeout_s
        self.record_ttl_s = record_ttl_s
        self._batcher = _Batcher(self, max_batch)

    @classmethod
    def from_url(cls, url: str, prefix: str = "trex:", **kwargs: Any) -> CounterStore:
        client = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=kwargs.pop("socket_timeout", 5.0),
            socket_connect_timeout=kwargs.pop("socket_connect_timeout", 2.0),
            health_check_interval=30,
        )
        return cls(client, prefix, **kwargs)

    async def aclose(self) -> None:
        self.closing = True
        await self.client.aclose()

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def channel(self) -> str:
        return f"{self.prefix}invalidate"

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

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

    # -- admission and settlement ---------------------------------------------------------------

    async def admit(
        self,
        req: AdmitRequest,
        balance_loader: Callable[[str], Awaitable[int]] | None = None,
    ) -> AdmitResult:
        """Admit or refuse in one round trip. With ``balance_loader`` (account_id -> micro-credits
        from the SQL ledger), a ``balance_missing`` answer loads the balance (SET NX) and retries
        once; without it the caller sees ``balance_missing`` and does the same."""
        if req.billing not in ("quota", "credits"):
            raise ValueError(f"billing must be 'quota' or 'credits', got {req.billing!r}")
        args = [
            self.prefix,
            req.request_id,
            req.key_id,
            req.account_id,
            _now_arg(req.now),
            int(req.rpm or 0),
            int(req.tpm or 0),
            max(0, int(req.tokens_estimate)),
            int(req.concurrency or 0),
            int(req.burst_concurrency or 0),
            max(1, math.ceil(req.lease_ttl_s * 1000)),
            "q" if req.billing == "quota" else "c",
            _opt(req.quota_requests),
            _opt(req.quota_tokens),
            max(0, int(req.reserve_micro)),
            _opt(req.key_daily_cap_micro),
            _opt(req.key_monthly_cap_micro),
            _opt(req.account_daily_cap_micro),
            _opt(req.account_monthly_cap_micro),
            repr(float(req.alert_at or 0.0)),
            int(self.record_ttl_s),
        ]
        result = _parse_admit(req, await self._call("admit", args))
        if result.code == BALANCE_MISSING and balance_loader is not None:
            await self.ensure_balance(req.account_id, int(await balance_loader(req.account_id)))
            result = _parse_admit(req, await self._call("admit", args))
        return result

    async def settle(self, req: SettleRequest) -> SettleResult:
        """Release the lease and settle quota or credits in one round trip; idempotent. A charge's
        ledger row goes into the ledger stream in the same step (``streams.py`` drains it to SQL)."""
        vw = int(req.velocity_window_s or 0)
        vmax = req.velocity_max_micro
        if vmax is None:
            vw = 0
        args = [
            self.prefix,
            req.request_id,
            "1" if req.success else "0",
            max(0, int(req.tokens_in)) + max(0, int(req.tokens_out)),
            max(0, int(req.charge_micro)),
            _now_arg(req.now),
            vw,
            int(vmax or 0),
            max(0, int(req.replay_ttl_s)),
            req.reason[:500],
        ]
        return _parse_settle(await self._call("settle", args))

    async def renew_lease(self, key_id: str, request_id: str, lease_ttl_s: float) -> bool:
        """Push a live lease's expiry to server-now + ttl (long streams); False if it is gone."""
        ms = max(1, math.ceil(lease_ttl_s * 1000))
        changed = await self._cmd(self._evalsha_keys("renew", [self._k("lease", key_id)], [request_id, ms]))
        return int(changed) == 1

    async def _evalsha_keys(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self._evalsha_direct(_SCRIPTS[name], args, keys)

    async def first_delivery(self, request_id: str, ttl_s: int = 600) -> bool:
        """True the first time a front-assigned request id arrives, False for a replay of it."""
        return bool(await self._cmd(self.client.set(self._k("delivered", request_id), "1", nx=True, ex=ttl_s)))

    # -- balances -------------------------------------------------------------------------------

    async def ensure_balance(self, account_id: str, micro: int) -> bool:
        """Load the available balance if Redis has none (SET NX). True when this call set it."""
        return bool(await self._cmd(self.client.set(self._k("bal", account_id), int(micro), nx=True)))

    async def set_balance(self, account_id: str, micro: int) -> int | None:
        """Overwrite the available balance; returns the previous value (None if there was none)."""
        prev = await self._cmd(self._evalsha_keys("set_balance", [self._k("bal", account_id)], [int(micro)]))
        return None if prev is None else int(prev)

    async def get_balance(self, account_id: str) -> int | None:
        raw = await self._cmd(self.client.get(self._k("bal", account_id)))
        return None if raw is None else int(raw)

    async def grant(self, account_id: str, micro: int) -> int | None:
        """Add (or with a negative amount, remove) credits if the balance is loaded; returns the new
        balance, or None when Redis has no balance (the next ensure_balance loads it from SQL)."""
        new = await self._cmd(self._evalsha_keys("grant", [self._k("bal", account_id)], [int(micro)]))
        return None if new is None else int(new)

    async def unbooked(self, account_id: str) -> int:
        """Micro-credits charged in Redis whose ledger rows still wait in the stream (not in SQL yet)."""
        return int(await self._cmd(self.client.get(self._k("unbooked", account_id))) or 0)

    async def drop_balance(self, account_id: str) -> None:
        """Forget the cached balance (the next credit admission reloads it from the ledger)."""
        await self._cmd(self.client.delete(self._k("bal", account_id)))

    # -- reads ----------------------------------------------------------------------------------

    async def _server_now(self, now: float | None) -> float:
        if now is not None:
            return float(now)
        sec, usec = await self._cmd(self.client.time())
        return int(sec) + int(usec) / 1_000_000

    async def quota_usage(self, account_id: str, now: float | None = None) -> dict[str, int]:
        """The account's quota use for the UTC day containing ``now``: {requests, tokens}."""
        from trex_serve.billing.pricing import utc_day

        day = utc_day(await self._server_now(now))
        raw = await self._cmd(self.client.hmget(self._k("quota", account_id, day), "requests", "tokens"))
        return {"requests": int(raw[0] or 0), "tokens": int(raw[1] or 0)}

    async def inflight(self, key_id: str, now: float | None = None) -> int:
        """Live (unexpired) leases of the key."""
        ms = math.floor(await self._server_now(now) * 1000)
        return int(await self._cmd(self.client.zcount(self._k("lease", key_id), f"({ms}", "+inf")))

    async def spent(self, scope: Literal["key", "account"], id: str, now: float | None = None) -> dict[str, int]:
        """Micro-credits spent (reservations included) in the day and month containing ``now``."""
        from trex_serve.billing.pricing import utc_day, utc_month

        t = await self._server_now(now)
        d, m = utc_day(t), utc_month(t)
        raw = await self._cmd(
            self.client.mget(self._k("spent", scope, id, "d", d), self._k("spent", scope, id, "m", m))
        )
        return {"day": int(raw[0] or 0), "month": int(raw[1] or 0)}

    async def rpm_used(self, key_id: str, now: float | None = None) -> int:
        window = math.floor(await self._server_now(now) / 60)
        return int(await self._cmd(self.client.get(self._k("rpm", key_id, str(window)))) or 0)

    # -- failed-auth throttle -------------------------------------------------------------------

    async def auth_failure(self, ip: str, limit_per_minute: int, now: float | None = None) -> tuple[bool, int]:
        """Count one unknown-key attempt from ``ip``; (blocked, retry_after). Blocked once the
        address made more than ``limit_per_minute`` such attempts in the current minute window."""
        raw = await self._call("auth", [self.prefix, ip, int(limit_per_minute), _now_arg(now), "hit"])
        return int(raw[0]) == 1, int(raw[1])

    async def auth_blocked(self, ip: str, limit_per_minute: int, now: float | None = None) -> int | None:
        """Without counting: retry_after if one more unknown-key attempt from ``ip`` would be
        refused in this window, else None."""
        raw = await self._call("auth", [self.prefix, ip, int(limit_per_minute), _now_arg(now), "check"])
        return int(raw[1]) if int(raw[0]) == 1 else None

    # -- revocation broadcast -------------------------------------------------------------------

    async def publish_invalidation(self, kind: str, id: str) -> int:
        """Tell every replica to drop a cached entity (``kind`` e.g. "key", "account")."""
        return int(await self._cmd(self.client.publish(self.channel, f"{kind}:{id}")))

    def subscribe_invalidations(
        self,
        callback: Callable[[str, str], Any],
        *,
        reconnect_delay_s: float = 0.5,
        max_delay_s: float = 5.0,
    ) -> asyncio.Task:
        """Run ``callback(kind, id)`` (sync or async) for every invalidation, in a background task
        that reconnects when Redis drops. After every (re)subscription it calls
        ``callback("*", "")``: messages may have been missed, so drop every cached entity.
        Cancel the returned task to stop."""

        async def deliver(kind: str, ident: str) -> None:
            try:
                out = callback(kind, ident)
                if inspect.isawaitable(out):
                    await out
            except Exception:  # noqa: BLE001 - a bad callback must not stop the subscription
                log.exception("invalidation callback failed for %s:%s", kind, ident)

        async def run() -> None:
            delay = reconnect_delay_s
            while not self.closing:
                pubsub = _ResyncPubSub(
                    self.client.connection_pool, event_dispatcher=getattr(self.client, "_event_dispatcher", None)
                )
                try:
                    await pubsub.subscribe(self.channel)
                    delay = reconnect_delay_s
                    while not self.closing:
                        if pubsub.resync:
                            pubsub.resync = False
                            await deliver("*", "")
                        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if msg is None or msg.get("type") != "message":
                            continue
                        kind, _, ident = _s(msg["data"]).partition(":")
                        await deliver(kind, ident)
                except asyncio.CancelledError:
                    raise
                except (RedisError, OSError) as exc:
                    log.warning("invalidation subscription lost (%s); reconnecting in %.1fs", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(max_delay_s, delay * 2)
                finally:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()

        return asyncio.get_running_loop().create_task(run(), name="trex-invalidations")
