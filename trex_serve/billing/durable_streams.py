"""Durable records through Redis streams: the credit ledger, request logs and risk events.

A replica's memory is no place for a settled charge: a SIGKILLed replica or a database outage
would take it along. So every record becomes durable in Redis first and reaches SQL from there:

* ledger rows are appended by the settlement script itself (``lua/settle.lua``) to
  ``{prefix}stream:ledger``, in the same atomic step that takes the credits, and counted in
  ``{prefix}unbooked:{account}`` until they are in SQL (the balance reload and ``billing reconcile``
  subtract that count, so a charge is never counted twice or missed);
* request-log rows and risk events are handed to ``{prefix}stream:logs`` / ``{prefix}stream:risk``
  by a :class:`~trex_serve.billing.writer.BatchWriter` that sends each event-loop turn's rows as one
  pipeline (one round trip shared by every request of the turn, none per request);
* every live replica runs a :class:`StreamDrainer` per stream, one consumer of the group ``sql``:
  it reads a batch, inserts it idempotently (each table has a unique key; ``ON CONFLICT DO
  NOTHING``), and only after the commit acknowledges and deletes the entries. A replica that dies
  leaves its read-but-unacknowledged entries pending; once they have been idle ``claim_idle_ms``
  another replica claims them (``XAUTOCLAIM``) and writes them. While the database refuses writes
  the entries simply stay in the stream: nothing is dropped for a full buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from trex_serve.redis_durability import Durability

log = logging.getLogger("trex.streams")

GROUP = "sql"

# XACK then XDEL each committed entry; a ledger entry's amount leaves the account's unbooked count
# only if this call is the one that acknowledged it (XACK answers 1 once per entry), so a row
# written twice by two consumers is still subtracted once.
# KEYS[1] stream; ARGV[1] group, ARGV[2] prefix, then triples (entry id, account id, amount).
_ACK_LUA = """
local n = 0
for i = 3, #ARGV, 3 do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    n = n + 1
    local amt = tonumber(ARGV[i + 2]) or 0
    if amt > 0 then
      local uk = ARGV[2] .. 'unbooked:' .. ARGV[i + 1]
      if redis.call('DECRBY', uk, amt) <= 0 then redis.call('DEL', uk) end
    end
  end
  redis.call('XDEL', KEYS[1], ARGV[i])
end
return n
"""


# While a drainer moves an account's ledger rows into SQL (from just before the commit until just
# after their acknowledgement lowers ``unbooked``), ``{prefix}booking:{account}`` is above zero: a
# reader of "SQL ledger + unbooked" that sees it retries, or it could count a charge twice or not
# at all. Expires, so a drainer that dies in between holds readers back for a minute at most.
BOOKING_TTL_S = 60
_UNMARK_LUA = """
for i = 1, #KEYS do
  if redis.call('DECR', KEYS[i]) <= 0 then redis.call('DEL', KEYS[i]) end
end
return 0
"""


def booking_key(prefix: str, account_id: str) -> str:
    return f"{prefix}booking:{account_id}"


def stream_key(prefix: str, name: str) -> str:
    return f"{prefix}stream:{name}"


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


# ---- entry shapes ------------------------------------------------------------------------------


def ledger_row(fields: dict[str, str]) -> dict[str, Any]:
    """A ledger stream entry (written by settle.lua) as a row for ``Repository.append_ledger``."""
    return {"account_id": fields["a"], "key_id": fields.get("k") or None, "request_id": fields["r"],
            "kind": "charge", "amount": -int(fields["amt"]), "reason": fields.get("why") or None,
            "tokens": orjson.loads(fields["u"]) if fields.get("u") else None,
            "created_at": datetime.fromtimestamp(int(fields["ms"]) / 1000, UTC)}


def _ledger_ack(fields: dict[str, str]) -> tuple[str, int]:
    return fields.get("a", ""), int(fields.get("amt") or 0)


def json_row(fields: dict[str, str]) -> dict[str, Any]:
    return orjson.loads(fields["j"])


def encode_row(row: dict[str, Any]) -> dict[str, bytes]:
    return {"j": orjson.dumps(row, default=str)}


class _Pipelined(Protocol):
    async def execute(self, commands: Sequence[Sequence[Any]]) -> list[Any]: ...


def appender(client: aioredis.Redis, prefix: str, name: str, durability: Durability | None = None,
             lean: _Pipelined | None = None) -> Callable[[list[dict[str, Any]]], Any]:
    """A ``BatchWriter`` flush that appends rows to a stream: one pipeline for the whole batch.
    With ``durability`` the pipeline ends with its WAIT, and a batch the replicas did not
    acknowledge fails, so the writer sends it again (rows are inserted once: idempotent keys).
    ``lean`` (the counter store's lean connection, admission/lean_redis.py) carries the batch in
    one write packed in C; redis-py's pipeline took about a third of a request log's cost in the
    ingress (docs/BENCHMARKS.md)."""
    key = stream_key(prefix, name)

    async def append(rows: list[dict[str, Any]]) -> None:
        if lean is not None:
            commands: list[Sequence[Any]] = [("XADD", key, "*", "j", orjson.dumps(row, default=str)) for row in rows]
            if durability is not None:
                commands.append(durability.command())
            replies = await lean.execute(commands)
        else:
            pipe = client.pipeline(transaction=False)
            for row in rows:
                pipe.xadd(key, encode_row(row))
            if durability is not None:
                pipe.execute_command(*durability.command())
            replies = await pipe.execute(raise_on_error=False)
        for reply in durability.results(replies) if durability is not None else replies:
            if isinstance(reply, BaseException):
                raise reply

    return append


# ---- the drainer ---------------------------------------------------------------------------------


class StreamDrainer:
    """Moves one stream's entries into SQL as this replica's consumer of the group ``sql``.
    ``write`` is a blocking batch insert that must be idempotent (run in a thread)."""

    def __init__(self, client: aioredis.Redis, prefix: str, name: str,
                 write: Callable[[list[dict[str, Any]]], None], *, consumer: str | None = None,
                 batch_size: int = 500, claim_idle_ms: int = 30_000, interval_s: float = 0.2) -> None:
        self.client = client
        self.prefix = prefix
        self.name = name
        self.key = stream_key(prefix, name)
        self._write = write
        self._decode = ledger_row if name == "ledger" else json_row
        self.consumer = consumer or consumer_name()
        self.batch_size = batch_size
        self.claim_idle_ms = claim_idle_ms
        self.interval_s = interval_s
        self.written = 0  # rows committed by this consumer
        self.claimed = 0  # entries taken over from consumers that went quiet (dead replicas)
        self.failures = 0  # batches the database refused (they stay in the stream)
        self.backlog = 0  # entries in the stream not yet in SQL, as last seen (all replicas)
        self.unacked = 0  # of those, read by some consumer and not yet acknowledged
        self._ack = client.register_script(_ACK_LUA)
        self._unmark = client.register_script(_UNMARK_LUA)
        self._lock = asyncio.Lock()
        self._group_ready = False
        self._claim_from = "0-0"
        self._tasks: list[asyncio.Task] = []
        self.closing = False

    # -- one pass --------------------------------------------------------------------------------

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self.client.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _read(self, start: str) -> list[tuple[str, dict[str, str] | None]]:
        reply = await self.client.xreadgroup(GROUP, self.consumer, {self.key: start}, count=self.batch_size)
        return list(reply[0][1]) if reply else []

    async def _next_batch(self) -> list[tuple[str, dict[str, str] | None]]:
        # First what this consumer read and could not commit, then what a quiet (dead) consumer
        # left pending, then new entries.
        entries = await self._read("0")
        if entries:
            return entries
        reply = await self.client.xautoclaim(self.key, GROUP, self.consumer, self.claim_idle_ms,
                                             start_id=self._claim_from, count=self.batch_size)
        self._claim_from = reply[0] if isinstance(reply[0], str) else reply[0].decode()
        if reply[1]:
            self.claimed += len(reply[1])
            log.info("%s stream: claimed %d entries left pending by another consumer", self.name, len(reply[1]))
            return list(reply[1])
        return await self._read(">")

    async def _commit(self, entries: list[tuple[str, dict[str, str] | None]]) -> bool:
        rows, acks, booking = [], [], set()
        for entry_id, fields in entries:
            account, amount = "", 0
            if fields:  # None: deleted after another consumer committed it; acknowledge only
                try:
                    rows.append(self._decode(fields))
                    if self.name == "ledger":
                        account, amount = _ledger_ack(fields)
                except (KeyError, ValueError, TypeError):
                    log.error("%s stream: unreadable entry %s skipped: %r", self.name, entry_id, fields)
            acks += [entry_id, account, amount]
            if account and int(amount) > 0:
                booking.add(booking_key(self.prefix, account))
        marks = sorted(booking)
        if marks:
            pipe = self.client.pipeline(transaction=False)
            for mark in marks:
                pipe.incr(mark)
                pipe.expire(mark, BOOKING_TTL_S)
            await pipe.execute()
        try:
            if rows:
                try:
                    await asyncio.to_thread(self._write, rows)
                except Exception:
                    self.failures += 1
                    log.warning("%s stream: database write failed; %d entries wait in Redis", self.name,
                                len(entries), exc_info=self.failures == 1)
                    return False
            self.written += len(rows)
            await self._ack(keys=[self.key], args=[GROUP, self.prefix, *acks])
            return True
        finally:
            if marks:
                with contextlib.suppress(RedisError, OSError):
                    await self._unmark(keys=marks)

    async def drain_once(self) -> bool:
        """Commit everything this consumer can take now; False if the database refused a batch."""
        async with self._lock:
            regroups = 0
            while True:
                try:
                    await self._ensure_group()
                    entries = await self._next_batch()
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc) or regroups >= 2:
                        raise
                    regroups += 1
                    self._group_ready = False  # Redis lost the stream (restart without persistence)
                    continue
                if not entries:
                    return True
                if not await self._commit(entries):
                    return False

    async def forget_quiet_consumers(self, idle_ms: int = 3_600_000) -> int:
        """Remove consumers (dead replicas) that hold nothing and were quiet for ``idle_ms``; a live
        consumer removed by mistake is recreated by its next read."""
        gone = 0
        for c in await self.client.xinfo_consumers(self.key, GROUP):
            name = c["name"] if isinstance(c["name"], str) else c["name"].decode()
            if int(c["pending"]) == 0 and int(c["idle"]) >= idle_ms and name != self.consumer:
                await self.client.xgroup_delconsumer(self.key, GROUP, name)
                gone += 1
        return gone

    async def refresh_stats(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.xlen(self.key)
        pipe.xpending(self.key, GROUP)
        length, pending = await pipe.execute(raise_on_error=False)
        if not isinstance(length, BaseException):
            self.backlog = int(length)
        if isinstance(pending, dict):
            self.unacked = int(pending.get("pending") or 0)

    # -- background loop -------------------------------------------------------------------------

    def start(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._run(), name=f"drain-{self.name}"),
                           loop.create_task(self._watch(), name=f"drain-stats-{self.name}")]

    async def _run(self) -> None:
        backoff = self.interval_s
        while not self.closing:
            try:
                ok = await self.drain_once()
            except (RedisError, OSError) as exc:
                log.warning("%s stream: Redis unavailable (%s)", self.name, exc)
                ok = False
            backoff = self.interval_s if ok else min(5.0, backoff * 2)
            await asyncio.sleep(backoff)

    async def _watch(self) -> None:
        # Apart from the drain loop: a write stuck on a locked database must not freeze the gauges.
        turns = 0
        while not self.closing:
            with contextlib.suppress(RedisError, OSError):
                await self.refresh_stats()
                if turns % 3000 == 0:  # every ~10 min at 0.2 s
                    await self.forget_quiet_consumers()
            turns += 1
            await asyncio.sleep(self.interval_s)

    async def close(self, timeout_s: float = 3.0) -> None:
        """Stop; commit what can be committed within ``timeout_s``. What is left stays in Redis
        for another replica (or the next start)."""
        self.closing = True
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout_s):
                if await self.drain_once():
                    # Leave no empty consumer behind in the group.
                    await self.client.xgroup_delconsumer(self.key, GROUP, self.consumer)


class DurableChannel:
    """What the runtime exposes per record kind (``runtime.logs``, ``runtime.ledger``,
    ``runtime.risk_events``): ``put`` (none for the ledger, which settle.lua appends), the drainer,
    and the counts tests and metrics read."""

    def __init__(self, drainer: StreamDrainer, writer: Any = None) -> None:
        self.drainer = drainer
        self.writer = writer  # a BatchWriter whose flush appends to the stream, or None

    def put(self, row: dict[str, Any]) -> bool:
        if self.writer is None:
            raise TypeError(f"{self.drainer.name} rows are appended by the settlement script")
        return bool(self.writer.put(row))

    @property
    def local_pending(self) -> int:
        """Rows still only in this replica's memory (less than one event-loop turn, unless Redis is down)."""
        return self.writer.pending if self.writer is not None else 0

    @property
    def pending(self) -> int:
        return self.local_pending + self.drainer.backlog

    @property
    def dropped(self) -> int:
        return self.writer.dropped if self.writer is not None else 0

    @property
    def failures(self) -> int:
        return self.drainer.failures + (self.writer.failures if self.writer is not None else 0)

    @property
    def written(self) -> int:
        return self.drainer.written

    def start(self) -> None:
        if self.writer is not None:
            self.writer.start()
        self.drainer.start()

    async def flush_once(self) -> bool:
        """Send what this replica holds to Redis, then commit the stream to SQL now."""
        ok = True
        if self.writer is not None:
            ok = await self.writer.flush_once()
        try:
            ok = await self.drainer.drain_once() and ok
            await self.drainer.refresh_stats()
        except (RedisError, OSError):
            return False
        return ok

    async def close(self) -> None:
        if self.writer is not None:
            await self.writer.close()
        await self.drainer.close()
