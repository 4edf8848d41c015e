"""The counter store shared by every replica: rate windows, concurrency leases, daily quota, credit
reservations, spend caps, velocity and the failed-auth throttle, kept in Redis.

Exactness comes from Lua: one atomic script per admission (``lua/admit.lua``) and one per
settlement (``lua/settle.lua``), both built on ``lua/_common.lua``. Throughput comes from group
commit: the admissions and settlements that coroutines issue in the same event-loop turn leave in
ONE pipeline. Both live in ``counter_scripts.py`` (script loading, NOSCRIPT, the pipeline); this
module holds the counter API.

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
import inspect
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from trex_serve.admission.counter_records import (
    AdmitRequest,
    AdmitResult,
    SettleRequest,
    SettleResult,
    _parse_admit,
    _parse_settle,
    _s,
)
from trex_serve.admission.counter_scripts import ScriptCaller, _now_arg, _opt
from trex_serve.admission.redis_urls import async_client, close_async
from trex_serve.errors import ServiceUnavailable
from trex_serve.redis_durability import Durability, NotReplicated

log = logging.getLogger(__name__)


# admission codes (the gateway maps them onto CONTRACT.md section 2)
RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
CONCURRENCY_LIMIT_EXCEEDED = "concurrency_limit_exceeded"
INSUFFICIENT_QUOTA = "insufficient_quota"
INSUFFICIENT_CREDITS = "insufficient_credits"
SPEND_LIMIT_EXCEEDED = "spend_limit_exceeded"
KEY_SUSPENDED = "api_key_suspended"  # over its velocity limit, suspension on its way to SQL
BALANCE_MISSING = "balance_missing"


# ---------------------------------------------------------------------------------------------
# the store


class _ResyncPubSub(PubSub):
    """redis-py reconnects a pubsub connection by itself and re-subscribes in ``on_connect``;
    flag every (re)connection, silent ones included, so the subscriber announces a resync."""

    resync = True  # the first subscription is a resync too

    async def on_connect(self, connection: Any) -> None:
        await super().on_connect(connection)
        self.resync = True


class CounterStore(ScriptCaller):
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
        lean: bool = True,
        durability: Durability | None = None,
    ) -> None:
        super().__init__(client, group_commit=group_commit, max_batch=max_batch, timeout_s=timeout_s, lean=lean,
                         durability=durability)
        self.prefix = prefix
        # Set when shutting down: background loops end on it even if redis-py swallows a cancellation.
        self.closing = False
        self.record_ttl_s = record_ttl_s
        self._releases: set[asyncio.Task] = set()  # refused admissions' leases being given back

    @classmethod
    def from_url(cls, url: str, prefix: str = "trex:", **kwargs: Any) -> CounterStore:
        """Any form of ``TREX_REDIS_URL``, Sentinel included (redis_urls.py)."""
        client = async_client(
            url,
            decode_responses=True,
            socket_timeout=kwargs.pop("socket_timeout", 5.0),
            socket_connect_timeout=kwargs.pop("socket_connect_timeout", 2.0),
            health_check_interval=30,
        )
        return cls(client, prefix, **kwargs)

    async def aclose(self) -> None:
        self.closing = True
        for task in list(self._releases):
            task.cancel()
        if self._lean is not None:
            self._lean.close()
        await close_async(self.client)

    # -- keys -----------------------------------------------------------------------------------

    @property
    def channel(self) -> str:
        return f"{self.prefix}invalidate"

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

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
        result = _parse_admit(req, await self._admit_call(req.request_id, args))
        if result.code == BALANCE_MISSING and balance_loader is not None:
            await self.ensure_balance(req.account_id, int(await balance_loader(req.account_id)))
            result = _parse_admit(req, await self._admit_call(req.request_id, args))
        return result

    async def _admit_call(self, request_id: str, args: list[Any]) -> Any:
        try:
            return await self._call("admit", args)
        except ServiceUnavailable as exc:
            not_replicated = exc.__cause__
            if isinstance(not_replicated, NotReplicated) and int(not_replicated.reply[0]) == 1:
                # The primary admitted it, no replica acknowledged it in time, and the client is
                # refused: its slot and reservation come back now, not when its lease expires.
                task = asyncio.get_running_loop().create_task(self._release_refused(request_id))
                self._releases.add(task)
                task.add_done_callback(self._releases.discard)
            raise

    async def _release_refused(self, request_id: str) -> None:
        """Sent once, not until acknowledged: while no replica acknowledges, every admission is
        refused, and a settlement retried for each would multiply the load on that primary. A
        give-back lost in a failover leaves the lease to be reaped when it expires."""
        args = self._settle_args(SettleRequest(request_id, success=False,
                                               reason="admission not acknowledged by Redis replicas"))
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await self._call_unacknowledged("settle", args)

    async def settle(self, req: SettleRequest, sent: asyncio.Future | None = None) -> SettleResult:
        """Release the lease and settle quota or credits in one round trip; idempotent. A charge's
        ledger row goes into the ledger stream in the same step (``billing/durable_streams.py`` drains it to SQL).
        ``sent`` resolves once the call is written to Redis: from then on Redis applies it before
        any call this process (or a client it answers) makes afterwards."""
        return _parse_settle(await self._call("settle", self._settle_args(req), sent=sent))

    def _settle_args(self, req: SettleRequest) -> list[Any]:
        vw = int(req.velocity_window_s or 0)
        vmax = req.velocity_max_micro
        if vmax is None:
            vw = 0
        return [
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
            orjson.dumps(req.usage).decode() if req.usage else "",
        ]

    async def admit_hit(self, key_id: str, rpm: int | None, now: float | None = None) -> AdmitResult:
        """A response-cache hit: one request against the key's RPM and nothing else (``lua/hit.lua``);
        nothing to settle afterwards. Batched with the admissions of the same event-loop turn."""
        raw = await self._call("hit", [self.prefix, key_id, _now_arg(now), int(rpm or 0)])
        remaining = int(raw[4])
        return AdmitResult(int(raw[0]) == 1, code=_s(raw[1]) or None, retry_after=int(raw[2]) or None,
                           rpm_limit=int(raw[3]) or None, rpm_remaining=remaining if remaining >= 0 else None,
                           rpm_reset=int(raw[5]))

    async def lift_velocity_stop(self, key_id: str) -> None:
        """The key's suspension is in SQL and announced: admission no longer needs its mark."""
        await self._cmd(self.client.delete(self._k("velstop", key_id)))

    async def renew_lease(self, key_id: str, request_id: str, lease_ttl_s: float) -> bool:
        """Push a live lease's expiry to server-now + ttl (long streams); False if it is gone."""
        ms = max(1, math.ceil(lease_ttl_s * 1000))
        changed = await self._cmd(self._evalsha_keys("renew", [self._k("lease", key_id)], [request_id, ms]))
        return int(changed) == 1

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

    async def booking_state(self, account_id: str) -> tuple[int, bool]:
        """The account's unbooked charges and whether a drainer is moving some of its ledger rows
        into SQL right now (``streams.booking_key``), read together."""
        unbooked, booking = await self._cmd(self.client.mget(
            self._k("unbooked", account_id), self._k("booking", account_id)))
        return int(unbooked or 0), int(booking or 0) > 0

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
