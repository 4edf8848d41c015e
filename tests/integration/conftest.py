"""The whole gateway in process for integration tests: SQL store (SQLite and PostgreSQL), real
Redis counters, the relay hop over real HTTP and mock upstream processes."""

from __future__ import annotations

import uuid

import httpx
import pytest
import sqlalchemy as sa

from tests.helpers import MockProcess, write_catalog
from trex_serve.catalog import load_catalog
from trex_serve.counters import CounterStore
from trex_serve.http_app import build_http_app
from trex_serve.pipeline import Pipeline
from trex_serve.pool_server import PoolServer
from trex_serve.relay import HttpRelay
from trex_serve.routing import Planner
from trex_serve.runtime import Runtime
from trex_serve.settings import Settings
from trex_serve.store.database import create_engine, migrate
from trex_serve.store.repository import Repository

PLAN = """
  - name: tight
    rpm: 3
    tpm: 1000000
    concurrency: 1
    burst_concurrency: 1
    daily_quota: {requests: 2, tokens: 100000}
    premium: false
"""


@pytest.fixture(scope="module")
def mocks():
    procs = {"alpha": MockProcess("alpha"), "beta": MockProcess("beta")}
    yield procs
    for p in procs.values():
        p.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'trex.db'}"
        return
    base = request.getfixturevalue("postgres_url")
    name = "trex_" + uuid.uuid4().hex[:10]
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    url = sa.engine.make_url(base).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


@pytest.fixture
async def gw(mocks, tmp_path, database_url, redis_url, key_prefix):
    for m in mocks.values():
        m.reset()
    catalog = load_catalog(write_catalog(tmp_path / "catalog.yaml", mocks, extra=PLAN))
    settings = Settings(catalog_path="", database_url=database_url, redis_url=redis_url, admin_token="op",
                        secret_key="test-secret", auth_failures_per_minute=5)
    engine = create_engine(database_url)
    migrate(engine)
    repo = Repository(engine, settings.secret_key)
    repo.sync_plans([p.model_dump() for p in catalog.plans])
    runtime = Runtime(settings, catalog, repo, CounterStore.from_url(redis_url, prefix=key_prefix))
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
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        client.runtime = runtime
        client.mocks = mocks
        yield client
    await runtime.close()
    await relay.close()
    await pool.stop()
    engine.dispose()


