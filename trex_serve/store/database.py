"""Engine creation and start-up migrations (Alembic, configured in code)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import StaticPool

log = logging.getLogger("trex.store")

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_PG_LOCK_ID = 0x7472_6578  # "trex": serialises migrations of replicas starting together


def default_database_url() -> str:
    from trex_serve.settings import state_dir

    return f"sqlite:///{state_dir() / 'trex.db'}"


def normalize_url(url: str | None) -> str:
    """Empty -> the local SQLite file; ``postgres://``/``postgresql://`` -> the psycopg 3 dialect."""
    if not url:
        return default_database_url()
    for scheme in ("postgres://", "postgresql://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=10000")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
    finally:
        cur.close()


def create_engine(url: str | None = None, **kwargs: Any) -> Engine:
    """An engine for ``TREX_DATABASE_URL`` (SQLite by default, PostgreSQL via psycopg 3)."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        opts: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 30}}
        if database in ("", ":memory:"):
            opts["poolclass"] = StaticPool
        else:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        opts.update(kwargs)
        engine = sa.create_engine(url, **opts)
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    opts = {"pool_pre_ping": True, "pool_size": 5, "max_overflow": 10, "pool_recycle": 1800}
    opts.update(kwargs)
    return sa.create_engine(url, **opts)


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


@contextlib.contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    database = engine.url.database or ""
    if database in ("", ":memory:"):
        yield
        return
    with open(f"{database}.migrate.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def migrate(engine: Engine) -> str | None:
    """Bring the schema to the newest revision; idempotent and safe for replicas starting together
    (PostgreSQL advisory lock / a lock file next to the SQLite database). Returns the revision."""
    cfg = alembic_config()
    is_sqlite = engine.dialect.name == "sqlite"
    lock = _sqlite_file_lock(engine) if is_sqlite else contextlib.nullcontext()
    with lock, engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK_ID})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return current_revision(engine)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()
