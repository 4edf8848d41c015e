"""CPU per row of ``Repository.insert_logs`` (the request-log writer) and ``append_ledger`` (the
credit ledger's), on SQLite and PostgreSQL.

Three ways of writing the same rows (``RequestRecord.row()`` dicts, as the ingress sends them), in
one run, batch by batch, each timed with ``time.process_time()`` (this process only: the
PostgreSQL server's own CPU is not counted):

- ``insert_logs``: the repository as it is;
- ``legacy``: the former code path, kept here to compare against (the same row preparation, then
  SQLAlchemy's generic ``conn.execute(insert, list_of_dicts)``);
- ``raw driver``: the driver's ``executemany`` of tuples built beforehand (sqlite3 / psycopg) --
  the floor: what the database and the driver cost, with no preparation at all.

    .venv/bin/python scripts/bench_log_insert.py [--rows 3000] [--rounds 5] [--batch 10 --batch 50]
        [--postgres postgresql://postgres@127.0.0.1:5432/test | --postgres ''] [--only logs|ledger]

The ledger is measured the same way, with its ``append_ledger`` and ``legacy`` (the former code,
below) writing the rows the ledger stream's drainer passes (``durable_streams.ledger_row``); no
raw-driver floor for it.

PostgreSQL is measured when the URL answers (a scratch database is created on that server and
dropped afterwards); the project's ``create_engine`` takes ``postgresql://`` (or ``postgres://``)
and turns it into the psycopg 3 dialect.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trex_serve.errors import InvalidRequest  # noqa: E402
from trex_serve.observability.request_record import RequestRecord  # noqa: E402
from trex_serve.store import Repository, create_engine, migrate  # noqa: E402
from trex_serve.store.database import normalize_url  # noqa: E402
from trex_serve.store.models import Account, LedgerEntry, RequestLog, utcnow  # noqa: E402
from trex_serve.store.shapes import (  # noqa: E402
    _LEDGER_COLUMNS,
    _LEDGER_LENGTHS,
    _LOG_COLUMNS,
    _LOG_LENGTHS,
    LEDGER_KINDS,
    _clip,
    as_utc,
    log,
)

Writer = Callable[[list[dict[str, Any]]], None]


def legacy_insert_logs(repo: Repository, rows: list[dict[str, Any]]) -> None:
    """The former ``HistoryMixin.insert_logs``, verbatim but for its docstring (for comparison)."""
    data = []
    for row in rows:
        if not row.get("account_id") or not row.get("request_id"):
            continue
        item = {k: v for k, v in row.items() if k in _LOG_COLUMNS}
        try:
            item["created_at"] = as_utc(item.get("created_at")) or utcnow()
        except (InvalidRequest, ValueError, OverflowError, OSError):
            item["created_at"] = utcnow()
        for col, default in (("attempts", 0), ("status", 0), ("latency_ms", 0.0), ("tokens_in", 0),
                             ("tokens_out", 0), ("tokens_cache_read", 0), ("tokens_cache_write", 0),
                             ("tokens_cache_write_1h", 0), ("tokens_reasoning", 0),
                             ("credits_charged", 0), ("stream", False)):
            if item.get(col) is None:
                item[col] = default
        for col in _LOG_COLUMNS:
            item.setdefault(col, None)
        data.append(_clip(item, _LOG_LENGTHS))
    if not data:
        return
    with repo.engine.begin() as conn:
        with_text = {d["account_id"] for d in data if d.get("prompt_text") or d.get("completion_text")}
        if with_text:
            opted = set(conn.execute(
                sa.select(Account.id).where(Account.id.in_(with_text), Account.log_content.is_(True))
            ).scalars())
            for d in data:
                if d["account_id"] not in opted:
                    d["prompt_text"] = d["completion_text"] = None
        stmt = repo._insert(RequestLog.__table__).on_conflict_do_nothing(index_elements=["request_id"])
        conn.execute(stmt, data)


def _legacy_ledger_row(row: dict[str, Any]) -> dict[str, Any]:
    """The former ``HistoryMixin._ledger_row``, verbatim."""
    data = {k: v for k, v in row.items() if k in _LEDGER_COLUMNS}
    kind = data.get("kind")
    if kind not in LEDGER_KINDS:
        raise ValueError(f"ledger kind must be one of {LEDGER_KINDS}, got {kind!r}")
    amount = int(data.get("amount") or 0)
    if kind == "charge":
        amount = -abs(amount)
    elif kind in ("grant", "refund"):
        amount = abs(amount)
    data["amount"] = amount
    data["created_at"] = as_utc(data.get("created_at")) or utcnow()
    data.setdefault("key_id", None)
    data.setdefault("request_id", None)
    data.setdefault("reason", None)
    data.setdefault("tokens", None)
    return data


def legacy_append_ledger(repo: Repository, rows: list[dict[str, Any]]) -> None:
    """The former ``HistoryMixin.append_ledger``, verbatim but for its docstring (for comparison)."""
    data = []
    for row in rows:
        try:
            data.append(_clip(_legacy_ledger_row(row), _LEDGER_LENGTHS))
        except (TypeError, ValueError, InvalidRequest) as exc:
            log.error("ledger row skipped (%s): %r", exc, row)
    if not data:
        return
    stmt = repo._insert(LedgerEntry.__table__).on_conflict_do_nothing(index_elements=["request_id", "kind"])
    with repo.engine.begin() as conn:
        conn.execute(stmt, data)


def make_ledger_rows(account_id: str, n: int, tag: str) -> list[dict[str, Any]]:
    """Rows shaped like the ledger drainer's (``durable_streams.ledger_row`` of settle.lua's entries)."""
    now = time.time()
    return [{"account_id": account_id, "key_id": "key_0123456789abcdef",
             "request_id": f"req_{tag}_{i:07d}_{uuid.uuid4().hex[:16]}", "kind": "charge",
             "amount": -(1234 + i % 500), "reason": "chat gpt-4o-mini" if i % 2 else None,
             "tokens": {"input": 1200 + i % 300, "output": 300 + i % 90, "cache_read": 512 * (i % 4 == 0)},
             "created_at": datetime.fromtimestamp(now + i / 1000, UTC)} for i in range(n)]


def make_rows(account_id: str, n: int, tag: str) -> list[dict[str, Any]]:
    """Rows shaped like the ingress's: ``RequestRecord.row()`` of a mix of requests."""
    rows = []
    for i in range(n):
        ok = i % 10 != 0
        rows.append(RequestRecord(
            request_id=f"req_{tag}_{i:07d}_{uuid.uuid4().hex[:16]}", api="chat" if i % 3 else "responses",
            account_id=account_id, key_id="key_0123456789abcdef", key_prefix="trex-abcdefg",
            model_requested="gpt-4o-mini", provider="openai" if ok else None,
            model_served="gpt-4o-mini-2024-07-18" if ok else None, attempts=1 + (i % 7 == 0), fallbacks=0,
            status=200 if ok else 502, error_code=None if ok else "upstream_unavailable",
            latency_ms=123.4 + i % 50, ttfb_ms=45.6 if ok else None, tokens_in=1200 + i % 300,
            tokens_out=300 + i % 90, billing="credits" if i % 2 else "quota", credits_charged=1234 * (i % 2),
            stream=bool(i % 2), client_ip="10.1.2.3",
            attempt_detail=[{"provider": "openai", "status": 200 if ok else 502, "latency_ms": 120.0}],
            tokens_cache_read=512 * (i % 4 == 0), tokens_reasoning=64 * (i % 5 == 0),
            cache="miss" if i % 4 else None,
        ).row())
    return rows


# ------------------------------------------------------------------ the raw drivers (the floor)

_COLUMNS = [c.name for c in RequestLog.__table__.columns if c.name != "id"]


def _raw_tuple(row: dict[str, Any], sqlite: bool) -> tuple[Any, ...]:
    out = []
    for col in _COLUMNS:
        value = row.get(col)
        if col == "created_at":
            when = datetime.fromtimestamp(value, UTC)
            value = when.strftime("%Y-%m-%d %H:%M:%S.%f") if sqlite else when
        elif col == "stream" and sqlite:
            value = int(value)
        out.append(value)
    return tuple(out)


def sqlite_raw(path: str) -> tuple[Callable[[list[tuple[Any, ...]]], None], Callable[[], None]]:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in ("foreign_keys=ON", "busy_timeout=10000", "journal_mode=WAL", "synchronous=NORMAL"):
        conn.execute(f"PRAGMA {pragma}")
    sql = (f"INSERT INTO request_logs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
           " ON CONFLICT (request_id) DO NOTHING")

    def write(batch: list[tuple[Any, ...]]) -> None:
        conn.execute("BEGIN")
        conn.executemany(sql, batch)
        conn.execute("COMMIT")

    return write, conn.close


def pg_raw(url: str) -> tuple[Callable[[list[tuple[Any, ...]]], None], Callable[[], None]]:
    import psycopg

    conn = psycopg.connect(url)
    sql = (f"INSERT INTO request_logs ({', '.join(_COLUMNS)}) VALUES ({', '.join(['%s'] * len(_COLUMNS))})"
           " ON CONFLICT (request_id) DO NOTHING")

    def write(batch: list[tuple[Any, ...]]) -> None:
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(sql, batch)

    return write, conn.close


# ------------------------------------------------------------------ measurement


def cpu_per_row(write: Callable[[list[Any]], None], batches: list[list[Any]]) -> float:
    """µs of this process's CPU per row to write ``batches`` one after another."""
    start = time.process_time()
    for batch in batches:
        write(batch)
    return (time.process_time() - start) / sum(len(b) for b in batches) * 1e6


def compare(title: str, engine: Engine, table: sa.Table, writers: dict[str, Callable[[list[Any]], None]],
            current: str, n_rows: int, rounds: int, batch_sizes: list[int],
            rows_for: Callable[[str, str], list[Any]]) -> None:
    """Best µs CPU per row of each writer per batch size, writers interleaved so that drift hits
    all alike; ``rows_for(label, tag)`` makes a writer's rows, unique by ``tag``."""
    print(f"\n{title}: µs CPU per row (best of {rounds} rounds of {n_rows} rows)")
    for size in batch_sizes:
        best = {label: float("inf") for label in writers}
        for r in range(rounds):
            for label, write in writers.items():
                items = rows_for(label, f"{size}_{r}_{label[:3]}")
                batches = [items[i:i + size] for i in range(0, len(items), size)]
                best[label] = min(best[label], cpu_per_row(write, batches))
                with engine.begin() as conn:  # the next writer starts from the same (empty) table
                    conn.execute(sa.delete(table))
        line = "  ".join(f"{label} {us:6.1f}" for label, us in best.items())
        print(f"  batch {size:3d}:  {line}   (legacy / {current} = {best['legacy'] / best[current]:.2f}x)")


def measure(name: str, engine: Engine, raw: tuple[Callable[..., None], Callable[[], None]], sqlite: bool,
            n_rows: int, rounds: int, batch_sizes: list[int]) -> None:
    migrate(engine)
    repo = Repository(engine, "bench-secret")
    repo.sync_plans([{"name": "free", "rpm": 60}])
    account = repo.create_account("bench", "free")["id"]
    raw_write, raw_close = raw
    writers: dict[str, Callable[[list[Any]], None]] = {
        "insert_logs": repo.insert_logs,
        "legacy": lambda rows: legacy_insert_logs(repo, rows),
        "raw driver": raw_write,
    }
    # Warm-up: connections opened, statements compiled and cached.
    for label, write in writers.items():
        rows = make_rows(account, 50, f"warm{label[:3]}")
        write([_raw_tuple(r, sqlite) for r in rows] if label == "raw driver" else rows)
    compare(f"{name}, request logs", engine, RequestLog.__table__, writers, "insert_logs", n_rows, rounds,
            batch_sizes, lambda label, tag: (
                [_raw_tuple(r, sqlite) for r in make_rows(account, n_rows, tag)] if label == "raw driver"
                else make_rows(account, n_rows, tag)))
    raw_close()
    engine.dispose()


def measure_ledger(name: str, engine: Engine, n_rows: int, rounds: int, batch_sizes: list[int]) -> None:
    migrate(engine)
    repo = Repository(engine, "bench-secret")
    repo.sync_plans([{"name": "free", "rpm": 60}])
    account = repo.create_account("bench", "free")["id"]
    writers: dict[str, Callable[[list[Any]], None]] = {
        "append_ledger": repo.append_ledger,
        "legacy": lambda rows: legacy_append_ledger(repo, rows),
    }
    for label, write in writers.items():  # warm-up
        write(make_ledger_rows(account, 50, f"warm{label[:3]}"))
    compare(f"{name}, ledger", engine, LedgerEntry.__table__, writers, "append_ledger", n_rows, rounds,
            batch_sizes, lambda _label, tag: make_ledger_rows(account, n_rows, tag))
    engine.dispose()


@contextmanager
def scratch_pg_database(url: str) -> Iterator[str | None]:
    """A fresh database on the server at ``url`` (its URL), dropped afterwards; None if no answer."""
    admin = sa.create_engine(normalize_url(url), isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool,
                             connect_args={"connect_timeout": 3})
    name = f"trex_bench_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        print(f"\nPostgreSQL at {url}: no answer, skipped ({str(exc).splitlines()[0]})")
        yield None
        return
    try:
        yield make_url(normalize_url(url)).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=3000, help="rows per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, action="append", help="batch size (repeatable; default 10, 50)")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test",
                        help="a PostgreSQL server to measure against ('' to skip)")
    parser.add_argument("--only", choices=("logs", "ledger"), help="measure one writer (default: both)")
    args = parser.parse_args()
    sizes = args.batch or [10, 50]
    logs, ledger = args.only in (None, "logs"), args.only in (None, "ledger")
    with tempfile.TemporaryDirectory(prefix="trex-bench-logs-") as tmp:
        path = str(Path(tmp) / "trex.db")
        if logs:
            measure("SQLite (file, WAL)", create_engine(f"sqlite:///{path}"), sqlite_raw(path), True,
                    args.rows, args.rounds, sizes)
        if ledger:
            measure_ledger("SQLite (file, WAL)", create_engine(f"sqlite:///{path}"), args.rows, args.rounds, sizes)
    if args.postgres:
        with scratch_pg_database(args.postgres) as url:
            if url:
                if logs:
                    # psycopg itself takes the libpq form of the URL (no "+psycopg").
                    raw = pg_raw(make_url(url).set(drivername="postgresql").render_as_string(hide_password=False))
                    measure("PostgreSQL (psycopg 3)", create_engine(url), raw, False, args.rows,
                            args.rounds, sizes)
                if ledger:
                    measure_ledger("PostgreSQL (psycopg 3)", create_engine(url), args.rows, args.rounds, sizes)


if __name__ == "__main__":
    main()
