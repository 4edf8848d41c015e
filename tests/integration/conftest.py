"""The whole gateway in process for integration tests: SQL store (SQLite and PostgreSQL), real
Redis counters, the relay hop over real HTTP and mock upstream processes."""

from __future__ import annotations

import uuid

import httpx
import pytest
import sqlalchemy as sa

from tests.helpers import write_catalog
from trex_serve.catalog import load_catalog
from trex_serve.local.standalone import standalone_gateway
from trex_serve.settings import Settings

PLAN = """
  - name: tight
    rpm: 3
    tpm: 1000000
    concurrency: 1
    burst_concurrency: 1
    daily_quota: {requests: 2, tokens: 100000}
    premium: false
  - name: cache-friendly
    rpm: 1000
    concurrency: 50
    daily_quota: {requests: 1000, tokens: 10000000}
    quota_tokens: uncached
"""


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
    async with standalone_gateway(settings, catalog, counters_prefix=key_prefix) as gateway:
        transport = httpx.ASGITransport(app=gateway.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            client.runtime = gateway.runtime
            client.mocks = mocks
            yield client


