"""Settled charges, request logs and risk events reach SQL exactly once through the Redis streams,
whatever happens to the replica that settled them or to the database, and the balance an account
reads counts every answered request (issue 14, parts 1 and 4). Real Redis, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
import uuid

import httpx
import pytest
import sqlalchemy as sa

from tests.helpers import write_catalog
from tests.integration.gateway import OP, account, chat, new_key
from trex_serve.admission.counter_records import AdmitRequest, SettleRequest
from trex_serve.admission.counters import CounterStore
from trex_serve.billing.balances import booked_totals, credit_view
from trex_serve.billing.durable_streams import GROUP, StreamDrainer, appender, json_row, ledger_row, stream_key
from trex_serve.billing.writer import BatchWriter
from trex_serve.local.billing_reconcile import reconcile
from trex_serve.store.database import create_engine, migrate
from trex_serve.store.repository import Repository

PLANS = [{"name": "free", "rpm": 1000, "tpm": 10_000_000, "concurrency": 50, "burst_concurrency": 50}]


@pytest.fixture
async def store(database_url, redis_url, key_prefix):
    engine = create_engine(database_url)
    migrate(engine)
    repo = Repository(engine, "test-secret")
    repo.sync_plans(PLANS)
    counters = CounterStore.from_url(redis_url, prefix=key_prefix)
    yield repo, counters
    keys = await counters.client.keys(key_prefix + "*")
    if keys:
        await counters.client.delete(*keys)
    await counters.aclose()
    engine.dispose()


async def settle_charges(counters: CounterStore, account_id: str, amounts: list[int]) -> list[str]:
    """Admit and settle one credit-billed request per amount (the real Lua scripts)."""
    ids = []
    for amount in amounts:
        rid = f"req_{uuid.uuid4().hex[:12]}"
        admitted = await counters.admit(AdmitRequest(request_id=rid, key_id="key_1", account_id=account_id,
                                                     billing="credits", reserve_micro=amount + 100))
        assert admitted.ok, admitted
        result = await counters.settle(SettleRequest(request_id=rid, charge_micro=amount, tokens_in=3,
                                                     tokens_out=4, reason="big-model 3+4 tokens"))
        assert result.charged_micro == amount
        ids.append(rid)
    return ids


def charges(repo: Repository, account_id: str) -> list[dict]:
    return [r for r in repo.list_ledger(account_id, limit=1000) if r["kind"] == "charge"]


async def pending_count(counters: CounterStore, name: str) -> int:
    return int((await counters.client.xpending(stream_key(counters.prefix, name), GROUP))["pending"])


async def test_a_dead_consumers_entries_are_claimed_and_each_row_written_once(store, database_url, redis_url):
    repo, counters = store
    acc = repo.create_account("a", "free")["id"]
    repo.grant_credits(acc, 10_000_000)
    await counters.ensure_balance(acc, repo.ledger_sum(acc))
    amounts = [700, 1_100, 2_300, 500, 900]
    ids = await settle_charges(counters, acc, amounts)
    # Settled in Redis: the balance is taken, every row waits in the stream, counted as unbooked.
    assert await counters.get_balance(acc) == 10_000_000 - sum(amounts)
    assert await counters.unbooked(acc) == sum(amounts)
    assert await counters.client.xlen(stream_key(counters.prefix, "ledger")) == 5
    assert charges(repo, acc) == []
    # Redis and the ledger agree once the unbooked charges are counted, while SQL is behind.
    report = await reconcile(database_url, redis_url, "x", prefix=counters.prefix)
    assert report["mismatched"] == 0 and report["ledger_stream_backlog"] == 5

    # A replica reads the five entries, commits three of them, and dies before acknowledging any.
    dead = StreamDrainer(counters.client, counters.prefix, "ledger", repo.append_ledger, consumer="dead")
    await dead._ensure_group()
    read = await dead._read(">")
    assert len(read) == 5
    repo.append_ledger([ledger_row(fields) for _, fields in read[:3]])
    assert await pending_count(counters, "ledger") == 5

    live = StreamDrainer(counters.client, counters.prefix, "ledger", repo.append_ledger, consumer="live",
                         claim_idle_ms=600_000)
    assert await live.drain_once() and live.claimed == 0, "entries of a consumer that may be alive stay its own"
    live.claim_idle_ms = 300  # the dead one stays quiet: its entries are taken over

    async def claimed() -> bool:
        await live.drain_once()
        return live.claimed == 5

    await eventually(claimed)
    rows = charges(repo, acc)
    assert sorted(r["request_id"] for r in rows) == sorted(ids), "every charge once, the three redelivered ones too"
    assert sum(r["amount_micro"] for r in rows) == -sum(amounts)
    assert {r["reason"] for r in rows} == {"big-model 3+4 tokens"}
    assert await counters.unbooked(acc) == 0, "subtracted once per entry although three were written twice"
    assert await pending_count(counters, "ledger") == 0
    assert await counters.client.xlen(stream_key(counters.prefix, "ledger")) == 0
    assert repo.ledger_sum(acc) == await counters.get_balance(acc)
    assert (await reconcile(database_url, redis_url, "x", prefix=counters.prefix))["mismatched"] == 0
    # The dead consumer, holding nothing any more, is forgotten; the live one stays.
    assert await live.forget_quiet_consumers(idle_ms=0) == 1
    names = {c["name"] for c in await counters.client.xinfo_consumers(live.key, GROUP)}
    assert names == {"live"}
    # The dead consumer's late acknowledgement (had it survived) changes nothing.
    await live._ack(keys=[live.key], args=[GROUP, counters.prefix, read[0][0], acc, amounts[0]])
    assert await counters.unbooked(acc) == 0


async def test_a_usage_read_while_a_drainer_books_the_rows_counts_each_charge_once(store):
    repo, counters = store
    acc = repo.create_account("a", "free")["id"]
    repo.grant_credits(acc, 10_000_000)
    await counters.ensure_balance(acc, repo.ledger_sum(acc))
    amounts = [700, 1_100, 2_300]
    await settle_charges(counters, acc, amounts)
    committed, release = threading.Event(), threading.Event()

    def write_then_wait(rows: list[dict]) -> None:
        repo.append_ledger(rows)  # committed to SQL; the acknowledgement has not happened yet
        committed.set()
        release.wait(10)

    drainer = StreamDrainer(counters.client, counters.prefix, "ledger", write_then_wait, consumer="slow")
    drain = asyncio.create_task(drainer.drain_once())
    while not committed.is_set():
        await asyncio.sleep(0.005)
    # In this window a plain "SQL ledger + unbooked" counts every charge twice...
    naive = credit_view(repo.ledger_totals(acc), None, await counters.unbooked(acc))
    assert naive["charged_micro"] == 2 * sum(amounts)
    # ... while the read the usage endpoints use waits for the batch to be acknowledged.
    read = asyncio.create_task(booked_totals(counters, repo.ledger_totals, acc))
    await asyncio.sleep(0.05)
    assert not read.done(), "no pair is taken while the account's rows are being booked"
    release.set()
    totals, unbooked = await read
    assert await drain
    assert credit_view(totals, None, unbooked)["charged_micro"] == sum(amounts)
    assert unbooked == 0 and await counters.booking_state(acc) == (0, False)


@contextlib.contextmanager
def writes_refused(database_url: str, engine: sa.Engine):
    """The database stops taking writes to the ledger (reads still work): SQLite's BEGIN EXCLUSIVE
    from another connection, PostgreSQL's table lock in EXCLUSIVE mode."""
    if database_url.startswith("sqlite"):
        conn = sqlite3.connect(engine.url.database, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    with engine.connect() as conn:
        tx = conn.begin()
        conn.execute(sa.text("SET LOCAL lock_timeout = '30s'"))
        conn.execute(sa.text("LOCK TABLE ledger, request_logs, risk_events IN EXCLUSIVE MODE"))
        try:
            yield
        finally:
            tx.rollback()


def short_write_waits(engine: sa.Engine) -> None:
    """Make a refused write fail in well under a second instead of waiting for the lock."""
    def on_connect(dbapi_conn, _record) -> None:
        if engine.dialect.name == "sqlite":
            dbapi_conn.execute("PRAGMA busy_timeout=200")
            return
        dbapi_conn.autocommit = True  # a plain SET inside the pool's first transaction would roll back
        dbapi_conn.execute("SET lock_timeout = '200ms'")
        dbapi_conn.autocommit = False

    sa.event.listen(engine, "connect", on_connect)
    engine.dispose()


async def test_rows_wait_in_redis_while_the_database_refuses_writes(store, database_url):
    repo, counters = store
    short_write_waits(repo.engine)
    acc = repo.create_account("a", "free")["id"]
    repo.grant_credits(acc, 5_000_000)
    await counters.ensure_balance(acc, repo.ledger_sum(acc))
    drainer = StreamDrainer(counters.client, counters.prefix, "ledger", repo.append_ledger)
    logs = StreamDrainer(counters.client, counters.prefix, "logs", repo.insert_logs)
    log_writer = BatchWriter("logs", appender(counters.client, counters.prefix, "logs"), wake_at=1)
    with writes_refused(database_url, repo.engine):
        ids = await settle_charges(counters, acc, [1_000, 2_000, 3_000])
        for rid in ids:
            log_writer.put({"request_id": rid, "account_id": acc, "api": "chat", "status": 200,
                            "model_requested": "big-model", "created_at": time.time()})
        assert await log_writer.flush_once() and log_writer.pending == 0, "logs are in Redis, not in memory"
        assert not await drainer.drain_once() and drainer.failures == 1
        assert not await logs.drain_once() and logs.failures == 1
        assert not await drainer.drain_once() and drainer.failures == 2, "retried, still refused"
        await drainer.refresh_stats()
        assert (drainer.backlog, drainer.unacked) == (3, 3), "nothing dropped, nothing acknowledged"
        assert charges(repo, acc) == []
        # The balance a user reads meanwhile already counts the three charges.
        assert await counters.get_balance(acc) == repo.ledger_sum(acc) - await counters.unbooked(acc)
    assert await drainer.drain_once() and await logs.drain_once()
    assert sorted(r["request_id"] for r in charges(repo, acc)) == sorted(ids)
    assert {r["request_id"] for r in repo.query_logs(acc, limit=10)} == set(ids)
    assert repo.ledger_sum(acc) == await counters.get_balance(acc) == 5_000_000 - 6_000
    await drainer.refresh_stats()
    assert (drainer.backlog, drainer.unacked) == (0, 0)


@pytest.mark.parametrize("connection", ["lean", "redis-py"])
async def test_duplicate_delivery_of_logs_and_risk_events_inserts_once(store, connection):
    """Rows appended over the lean connection (as the gateway does) or redis-py's pipeline read
    back the same."""
    repo, counters = store
    acc = repo.create_account("a", "free")["id"]
    lean = counters.lean if connection == "lean" else None
    assert lean is not None or connection == "redis-py"
    for name, write in (("logs", repo.insert_logs), ("risk", repo.add_risk_events)):
        put = appender(counters.client, counters.prefix, name, lean=lean)
        rows = [{"request_id": f"req_{name}_{i}", "account_id": acc, "api": "chat", "status": 200,
                 "model_requested": "m", "kind": "spend_alert", "event_id": f"evt_{name}_{i}",
                 "detail": {"i": i}, "created_at": time.time()} for i in range(4)]
        await put(rows)
        first = StreamDrainer(counters.client, counters.prefix, name, write, consumer="first")
        await first._ensure_group()
        entries = await first._read(">")
        assert len(entries) == 4
        # Committed by the first consumer, which dies before its acknowledgement ...
        write([json_row(fields) for _, fields in entries])
        second = StreamDrainer(counters.client, counters.prefix, name, write, consumer="second", claim_idle_ms=0)
        assert await second.drain_once() and second.claimed == 4  # ... so it is delivered again
        assert await pending_count(counters, name) == 0
    logs = repo.query_logs(acc, limit=100)
    assert sorted(r["request_id"] for r in logs) == [f"req_logs_{i}" for i in range(4)]
    assert {r["model_requested"] for r in logs} == {"m"}
    events = repo.list_risk_events(acc, limit=100)
    assert sorted(e["detail"]["i"] for e in events) == [0, 1, 2, 3]


async def eventually(check, timeout: float = 15.0, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)


# ---- through the gateway -------------------------------------------------------------------------


async def test_usage_read_right_after_an_answer_shows_its_charge(gw, database_url):
    acc = await account(gw, credits=3)
    key = await new_key(gw, acc)
    owner = {"Authorization": f"Bearer {acc['owner_token']}"}
    engine = gw.runtime.repo.engine
    before = (await gw.get(f"/admin/v1/accounts/{acc['id']}/usage", headers=OP)).json()["credits"]
    assert before["balance_micro"] == 3_000_000
    # The database takes no ledger writes: what the user reads cannot come from the SQL ledger.
    with writes_refused(database_url, engine):
        r = await chat(gw, key["key"], model="big-model")
        assert r.status_code == 200 and r.headers["x-trex-billing"] == "credits"
        use = r.json()["usage"]
        cost = use["prompt_tokens"] * 5 + use["completion_tokens"] * 15
        for path, headers in ((f"/admin/v1/accounts/{acc['id']}/usage", OP), ("/v1/dashboard/usage", owner)):
            got = await gw.get(path, headers=headers)
            assert got.status_code == 200, got.text
            credits = got.json()["credits"]
            assert credits["balance_micro"] == 3_000_000 - cost, path
            assert credits["charged_micro"] == cost and credits["balance_source"] == "live"
            assert credits["ledger_balance_micro"] == 3_000_000, "the SQL ledger is behind ..."
            assert credits["granted_micro"] - credits["charged_micro"] - credits["reserved_micro"] == \
                credits["balance_micro"]
        # /metrics shows the ledger row waiting for the database (the gauge is read apart from the
        # drain, which is stuck on the lock).
        async def gauged() -> bool:
            text = (await gw.get("/metrics")).text
            return 'trex_stream_backlog{stream="ledger"} 1.0' in text

        await eventually(gauged)
    # ... and catches up.
    async def booked() -> bool:
        await gw.runtime.ledger.flush_once()
        return gw.runtime.repo.ledger_sum(acc["id"]) == 3_000_000 - cost

    await eventually(booked)
    credits = (await gw.get("/v1/dashboard/usage", headers=owner)).json()["credits"]
    assert credits["balance_micro"] == credits["ledger_balance_micro"] == 3_000_000 - cost


async def test_a_sigkilled_replica_loses_no_settled_charge(mocks, tmp_path, redis_url, key_prefix):
    """Premium requests answered by replica A while the database refuses writes; A has read ledger
    rows from the stream and is SIGKILLed before it could commit them. Replica B claims what A read
    and reads the rest."""
    from tests.integration.replica_process import ReplicaProcess

    for m in mocks.values():
        m.reset()
    catalog = str(write_catalog(tmp_path / "catalog.yaml", mocks))
    db = f"sqlite:///{tmp_path / 'trex.db'}"
    a = ReplicaProcess(catalog, db, redis_url, key_prefix, claim_idle_ms=500)
    b = None
    counters = CounterStore.from_url(redis_url, prefix=key_prefix)
    engine = create_engine(db)
    try:
        async with httpx.AsyncClient(base_url=a.url, timeout=30) as client:
            acc = await account(client, credits=5)
            key = await new_key(client, acc)
            assert (await chat(client, key["key"], model="big-model")).status_code == 200  # key cached
            await eventually(lambda: _ledger_rows(engine, acc["id"], 2))  # the grant and that charge
            start = await counters.get_balance(acc["id"])
            with writes_refused(db, engine):
                answers = await asyncio.gather(*[chat(client, key["key"], model="big-model") for _ in range(12)])
                assert all(r.status_code == 200 for r in answers)
                cost = sum(r.json()["usage"]["prompt_tokens"] * 5 + r.json()["usage"]["completion_tokens"] * 15
                           for r in answers)
                assert await counters.get_balance(acc["id"]) == start - cost

                async def read_by_a() -> bool:
                    return await pending_count(counters, "ledger") >= 1

                # A holds what it read (its database write blocked); the rest it never read.
                await eventually(read_by_a)
                a.kill()
            b = ReplicaProcess(catalog, db, redis_url, key_prefix, claim_idle_ms=500)
            await eventually(lambda: _ledger_rows(engine, acc["id"], 14), timeout=30)
        with engine.connect() as conn:
            ledger = conn.execute(sa.text("SELECT coalesce(sum(amount), 0) FROM ledger WHERE account_id = :a"),
                                  {"a": acc["id"]}).scalar()
            dupes = conn.execute(sa.text("SELECT count(*) - count(DISTINCT request_id) FROM ledger "
                                         "WHERE kind = 'charge'")).scalar()
        assert dupes == 0
        assert ledger == await counters.get_balance(acc["id"]) == start - cost
        assert await counters.unbooked(acc["id"]) == 0
    finally:
        a.kill()
        if b is not None:
            b.stop()
        await counters.aclose()
        engine.dispose()


async def _ledger_rows(engine: sa.Engine, account_id: str, n: int) -> bool:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM ledger WHERE account_id = :a"),
                            {"a": account_id}).scalar() == n
