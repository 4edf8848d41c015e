"""An INSERT compiled once for one database and run through the driver's ``executemany``: the
request-log and ledger writers of store/history.py, which every ingress runs for each batch it
drains from Redis."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import sqlalchemy as sa


class CompiledInsert:
    """An INSERT compiled once for one database, run through the driver's ``executemany``.

    ``conn.execute(insert, list_of_dicts)`` has SQLAlchemy work out again, for every batch and every
    row, which parameters the statement takes and how each value is converted: for the request logs
    that was over a third of the CPU of a write (``scripts/bench_log_insert.py``). Here the statement
    is compiled once, as SQLAlchemy compiles it for an executemany, and each parameter's bind
    processor is looked up once: the very function SQLAlchemy applies (on SQLite, datetimes to text
    and booleans to 0/1), so what reaches the table is the same. ``exec_driver_sql`` keeps
    SQLAlchemy's error wrapping and disconnect handling. Rows come as lists in ``names`` order."""

    def __init__(self, stmt: Any, dialect: sa.Dialect, columns: Collection[str]) -> None:
        keys = [c.name for c in stmt.table.columns if c.name in columns]
        compiled = stmt.compile(dialect=dialect, column_keys=keys, for_executemany=True)
        # The driver's paramstyle decides the shape of a row: qmark (SQLite) takes tuples in
        # statement order, pyformat (psycopg) dicts by name.
        self.positional: bool = compiled.positional
        self.names: tuple[str, ...] = tuple(compiled.positiontup if self.positional else compiled.binds)
        if sorted(self.names) != sorted(keys):
            raise RuntimeError(f"unexpected parameters {self.names} for the columns {keys}")
        self.index: dict[str, int] = {name: i for i, name in enumerate(self.names)}
        self.sql: str = compiled.string
        self.processors: list[tuple[int, Callable[[Any], Any]]] = [
            (i, processor) for i, name in enumerate(self.names)
            if (processor := compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect))
        ]
        # Each text column's size, for callers to clip to as ``_clip`` does.
        self.lengths: list[tuple[int, int]] = [
            (self.index[c.name], c.type.length) for c in stmt.table.columns
            if c.name in self.index and getattr(c.type, "length", None)
        ]

    def clip(self, values: list[Any]) -> None:
        """As ``_clip``: over-long text cut to its column, a non-text value in a text column made text."""
        for i, size in self.lengths:
            value = values[i]
            if value is not None:
                values[i] = (value if isinstance(value, str) else str(value))[:size]

    def execute(self, conn: sa.Connection, rows: list[list[Any]]) -> None:
        for values in rows:
            for i, processor in self.processors:
                values[i] = processor(values[i])
        if self.positional:
            conn.exec_driver_sql(self.sql, [tuple(values) for values in rows])
        else:
            names = self.names
            conn.exec_driver_sql(self.sql, [dict(zip(names, values, strict=True)) for values in rows])
