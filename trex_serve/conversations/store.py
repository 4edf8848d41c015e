"""Stored responses in SQL, the system of record: one row per response, keyed by (account, id), its
content encrypted with TREX_SECRET_KEY (the same secret, and the same Fernet box, as provider keys at
rest), an expiry enforced on every read and by a periodic purge.

A conversation is a chain of rows linked by ``previous_response_id``; :meth:`ResponseStore.chain`
reads all of it in ONE query (a recursive CTE, on SQLite and PostgreSQL alike), so a 50-turn
conversation costs one round trip, not fifty. Synchronous (SQLAlchemy); callers run it in a thread."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from trex_serve.store.crypto import SecretBox
from trex_serve.store.models import StoredResponse
from trex_serve.store.shapes import as_utc

_T = StoredResponse.__table__
# Deeper than any conversation a client keeps going turn after turn; a bound on the recursive read.
MAX_CHAIN = 1000


@dataclass
class Turn:
    """One stored response: this turn's own input items and the response object as answered."""

    id: str
    previous_response_id: str | None
    input: list[dict[str, Any]]
    response: dict[str, Any]
    model: str | None = None
    created_at: datetime | None = None
    key_id: str | None = None
    request_id: str | None = None

    @property
    def output(self) -> list[dict[str, Any]]:
        out = self.response.get("output")
        return out if isinstance(out, list) else []


@dataclass
class Chain:
    """A response and its ancestors, oldest first, or what went wrong reading them."""

    turns: list[Turn] = field(default_factory=list)
    missing: str | None = None  # an ancestor that is gone (deleted or expired): the chain is broken
    too_long: bool = False


class ResponseStore:
    def __init__(self, engine: Engine, secret_key: str) -> None:
        self.engine = engine
        self.box = SecretBox(secret_key)

    # ---- content at rest ------------------------------------------------------------------------

    def _seal(self, turn: Turn) -> str:
        return self.box.encrypt(orjson.dumps({"input": turn.input, "response": turn.response}).decode())

    def _open(self, row: Any) -> Turn:
        content = orjson.loads(self.box.decrypt(row.content))
        return Turn(row.id, row.previous_response_id, content.get("input") or [], content.get("response") or {},
                    row.model, as_utc(row.created_at), row.key_id, row.request_id)

    # ---- writes -----------------------------------------------------------------------------------

    def save(self, account_id: str, turn: Turn, created_at: datetime, expires_at: datetime) -> bool:
        """Insert; an id already stored for the account is left as it was (False): a stored response
        never changes, so a conversation built on it cannot change under its later turns."""
        row = {"account_id": account_id, "id": turn.id, "previous_response_id": turn.previous_response_id,
               "key_id": turn.key_id, "request_id": turn.request_id, "model": (turn.model or "")[:256] or None,
               "created_at": created_at, "expires_at": expires_at, "content": self._seal(turn)}
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        stmt = insert(_T).values(**row).on_conflict_do_nothing(index_elements=["account_id", "id"])
        with self.engine.begin() as conn:
            return bool(conn.execute(stmt).rowcount)

    def delete(self, account_id: str, response_id: str, now: datetime) -> bool:
        with self.engine.begin() as conn:
            gone = conn.execute(sa.delete(_T).where(_T.c.account_id == account_id, _T.c.id == response_id,
                                                    _T.c.expires_at > now))
            return bool(gone.rowcount)

    def purge(self, now: datetime, batch: int = 5000) -> int:
        """Delete expired rows, a batch at a time (a long delete would hold locks writers wait on)."""
        total = 0
        while True:
            with self.engine.begin() as conn:
                ids = conn.execute(sa.select(_T.c.account_id, _T.c.id).where(_T.c.expires_at <= now)
                                   .limit(batch)).all()
                if not ids:
                    return total
                conn.execute(sa.delete(_T).where(_T.c.account_id == sa.bindparam("a"), _T.c.id == sa.bindparam("i")),
                             [{"a": a, "i": i} for a, i in ids])
            total += len(ids)

    # ---- reads ------------------------------------------------------------------------------------

    def get(self, account_id: str, response_id: str, now: datetime) -> Turn | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(_T).where(_T.c.account_id == account_id, _T.c.id == response_id,
                                                   _T.c.expires_at > now)).first()
        return self._open(row) if row is not None else None

    def chain(self, account_id: str, response_id: str, now: datetime, max_turns: int = MAX_CHAIN) -> Chain | None:
        """The response and every ancestor, oldest first, in one query; None when the response itself
        is unknown to this account or expired."""
        base = (sa.select(_T.c.id, _T.c.previous_response_id, sa.literal(0).label("depth"))
                .where(_T.c.account_id == account_id, _T.c.id == response_id)
                .cte("chain", recursive=True))
        step = (sa.select(_T.c.id, _T.c.previous_response_id, (base.c.depth + 1).label("depth"))
                .join(base, sa.and_(_T.c.account_id == account_id, _T.c.id == base.c.previous_response_id))
                .where(base.c.depth < max_turns))
        walk = base.union_all(step)
        query = (sa.select(_T, walk.c.depth)
                 .join(walk, sa.and_(_T.c.account_id == account_id, _T.c.id == walk.c.id))
                 .order_by(walk.c.depth.desc()))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        if not rows or rows[-1].depth != 0 or as_utc(rows[-1].expires_at) <= now:
            return None
        out = Chain()
        oldest = rows[0]
        if oldest.previous_response_id is not None:
            if oldest.depth >= max_turns:
                out.too_long = True
            else:
                out.missing = oldest.previous_response_id
            return out
        for row in rows:
            if as_utc(row.expires_at) <= now:
                out.missing = row.id
                return out
        out.turns = [self._open(row) for row in rows]
        return out
