"""The ledger, request logs, audit trail and risk events (part of Repository)."""


from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from functools import cached_property
from typing import Any

import sqlalchemy as sa
from sqlmodel import select

from trex_serve.errors import InvalidRequest, NotFound
from trex_serve.store.compiled_insert import CompiledInsert
from trex_serve.store.models import (
    Account,
    AuditLog,
    LedgerEntry,
    RequestLog,
    RiskEvent,
    utcnow,
)
from trex_serve.store.shapes import (
    _LEDGER_COLUMNS,
    _LEDGER_LENGTHS,
    _LOG_COLUMNS,
    LEDGER_KINDS,
    _audit_dict,
    _clip,
    _ledger_dict,
    _log_dict,
    _risk_event_dict,
    as_utc,
    log,
    redact,
)

# What a request-log column holds when a row leaves it out or sets None.
_LOG_DEFAULTS = (("attempts", 0), ("status", 0), ("latency_ms", 0.0), ("tokens_in", 0), ("tokens_out", 0),
                 ("tokens_cache_read", 0), ("tokens_cache_write", 0), ("tokens_cache_write_1h", 0),
                 ("tokens_reasoning", 0), ("credits_charged", 0), ("stream", False))


class HistoryMixin:
    """Append-mostly records: the credit ledger, request logs, audit trail and risk events."""


    def grant_credits(
        self, account_id: str, amount_micro: int, reason: str | None = None, actor: str = "operator"
    ) -> dict[str, Any]:
        if not isinstance(amount_micro, int) or isinstance(amount_micro, bool) or amount_micro <= 0:
            raise InvalidRequest("amount must be greater than 0", param="amount")
        with self._session() as s, s.begin():
            if s.get(Account, account_id) is None:
                raise NotFound(f"No account {account_id!r}", param="account_id")
            row = LedgerEntry(account_id=account_id, kind="grant", amount=amount_micro,
                              reason=(reason or "grant")[:500])
            s.add(row)
            s.flush()
            out = _ledger_dict(row)
            self._audit(s, actor, "credits.grant", "account", account_id, account_id, None, out)
        return out

    @staticmethod
    def _ledger_row(row: dict[str, Any]) -> dict[str, Any]:
        data = {k: v for k, v in row.items() if k in _LEDGER_COLUMNS}
        kind = data.get("kind")
        if kind not in LEDGER_KINDS:
            raise ValueError(f"ledger kind must be one of {LEDGER_KINDS}, got {kind!r}")
        amount = int(data.get("amount") or 0)
        # Signs are fixed by kind: charges debit, grants and refunds credit, adjustments are signed.
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

    def append_ledger(self, rows: list[dict[str, Any]]) -> None:
        """Batch insert; a row whose (request_id, kind) already exists is skipped, so a retried batch
        never double-writes. ``amount`` is micro-credits; its sign is set by ``kind`` (charge < 0)."""
        data = []
        for row in rows:
            try:
                data.append(_clip(self._ledger_row(row), _LEDGER_LENGTHS))
            except (TypeError, ValueError, InvalidRequest) as exc:
                log.error("ledger row skipped (%s): %r", exc, row)
        if not data:
            return
        stmt = self._insert(LedgerEntry.__table__).on_conflict_do_nothing(
            index_elements=["request_id", "kind"]
        )
        with self.engine.begin() as conn:
            conn.execute(stmt, data)

    def ledger_sum(self, account_id: str) -> int:
        with self._session() as s:
            total = s.exec(
                select(sa.func.coalesce(sa.func.sum(LedgerEntry.amount), 0))
                .where(LedgerEntry.account_id == account_id)
            ).one()
        return int(total)

    def ledger_totals(self, account_id: str) -> dict[str, int]:
        """Micro-credit totals: granted, charged (positive number), refunded, adjusted, balance."""
        with self._session() as s:
            rows = s.exec(
                select(LedgerEntry.kind, sa.func.sum(LedgerEntry.amount))
                .where(LedgerEntry.account_id == account_id)
                .group_by(LedgerEntry.kind)
            ).all()
        by_kind = {k: int(v or 0) for k, v in rows}
        return {
            "granted": by_kind.get("grant", 0),
            "charged": -by_kind.get("charge", 0),
            "refunded": by_kind.get("refund", 0),
            "adjusted": by_kind.get("adjust", 0),
            "balance": sum(by_kind.values()),
        }

    def all_balances(self) -> dict[str, int]:
        with self._session() as s:
            rows = s.exec(
                select(LedgerEntry.account_id, sa.func.sum(LedgerEntry.amount))
                .group_by(LedgerEntry.account_id)
            ).all()
        return {acc: int(total or 0) for acc, total in rows}

    def list_ledger(self, account_id: str, limit: int = 50) -> list[dict[str, Any]]:
        with self._session() as s:
            q = (select(LedgerEntry).where(LedgerEntry.account_id == account_id)
                 .order_by(LedgerEntry.created_at.desc(), LedgerEntry.id.desc()).limit(limit))
            return [_ledger_dict(e) for e in s.exec(q)]

    # ---------------------------------------------------------------- request logs

    def _compiled_insert(
        self, table: sa.Table, conflict: list[str], columns: Collection[str]
    ) -> CompiledInsert:
        """``INSERT ... ON CONFLICT (conflict) DO NOTHING`` of ``columns`` into ``table``, compiled
        for this repository's database."""
        with self.engine.connect():  # the first connection initialises the dialect (server version...)
            pass
        stmt = self._insert(table).on_conflict_do_nothing(index_elements=conflict)
        return CompiledInsert(stmt, self.engine.dialect, columns)

    @cached_property
    def _log_insert(self) -> CompiledInsert:
        """The request-log INSERT for this repository's database, compiled on first use."""
        return self._compiled_insert(RequestLog.__table__, ["request_id"], _LOG_COLUMNS)

    def insert_logs(self, rows: list[dict[str, Any]]) -> None:
        """Batch insert; a row whose request_id already exists is skipped. Prompt/completion text is
        kept only for accounts that opted in (``log_content``). Unknown keys are ignored (so
        ``RequestRecord.row()`` can be passed as is); rows without an account (refused before
        authentication) are not stored; ``created_at`` may be a datetime, ISO text or epoch seconds.

        Every ingress writes a batch every few hundred milliseconds, so this is written for CPU: each
        row becomes a list in the compiled statement's column order (``CompiledInsert``), with the
        same defaults and clipping as ``_clip``, rather than a dict for SQLAlchemy to process."""
        insert = self._log_insert
        names, at = insert.names, insert.index
        created_at, account_id = at["created_at"], at["account_id"]
        prompt, completion = at["prompt_text"], at["completion_text"]
        defaults = [(at[col], default) for col, default in _LOG_DEFAULTS]
        data = []
        for row in rows:
            if not row.get("account_id") or not row.get("request_id"):
                continue
            get = row.get
            values = [get(name) for name in names]  # absent keys are None, unknown keys ignored
            try:
                values[created_at] = as_utc(values[created_at]) or utcnow()
            except (InvalidRequest, ValueError, OverflowError, OSError):
                values[created_at] = utcnow()
            for i, default in defaults:
                if values[i] is None:
                    values[i] = default
            insert.clip(values)
            data.append(values)
        if not data:
            return
        with self.engine.begin() as conn:
            with_text = {values[account_id] for values in data if values[prompt] or values[completion]}
            if with_text:
                opted = set(conn.execute(
                    sa.select(Account.id).where(Account.id.in_(with_text), Account.log_content.is_(True))
                ).scalars())
                for values in data:
                    if values[account_id] not in opted:
                        values[prompt] = values[completion] = None
            insert.execute(conn, data)

    def token_totals(self, account_id: str, since: datetime) -> dict[str, dict[str, int]]:
        """Tokens by class since ``since``, per billing mode (``quota`` / ``credits``), from the
        request logs: what the account's traffic was made of, and what each class was billed at."""
        c = RequestLog
        cache = c.tokens_cache_read + c.tokens_cache_write + c.tokens_cache_write_1h
        columns = (("input", c.tokens_in - cache), ("cache_read", c.tokens_cache_read),
                   ("cache_write", c.tokens_cache_write), ("cache_write_1h", c.tokens_cache_write_1h),
                   ("output", c.tokens_out), ("reasoning", c.tokens_reasoning), ("credits_micro", c.credits_charged))
        q = (select(c.billing, *(sa.func.coalesce(sa.func.sum(col), 0) for _, col in columns))
             .where(c.account_id == account_id, c.created_at >= since, c.billing.is_not(None))
             .group_by(c.billing))
        with self._session() as s:
            rows = s.exec(q).all()
        return {str(row[0]): {name: int(v) for (name, _), v in zip(columns, row[1:], strict=True)}
                for row in rows}

    def query_logs(
        self,
        account_id: str,
        limit: int = 50,
        before: datetime | str | None = None,
        status: int | str | None = None,
        model: str | None = None,
        key_id: str | None = None,
        since: datetime | str | None = None,
    ) -> list[dict[str, Any]]:
        """Newest first. ``before``: a timestamp, or the request_id of the last row already seen
        (rows strictly older are returned). ``status``: an exact code, or ``2xx``/``4xx``/``5xx``,
        ``ok``/``error``. ``model`` matches the requested or the served model."""
        limit = max(1, min(int(limit), 1000))
        order = (RequestLog.created_at.desc(), RequestLog.id.desc())
        q = select(RequestLog).where(RequestLog.account_id == account_id)
        with self._session() as s:
            if before is not None:
                cursor = None
                if isinstance(before, str) and _parse_ts(before) is None:
                    cursor = s.exec(select(RequestLog).where(RequestLog.request_id == before,
                                                             RequestLog.account_id == account_id)).first()
                    if cursor is None:
                        raise InvalidRequest(f"unknown cursor {before!r}", param="before")
                if cursor is not None:
                    q = q.where(sa.or_(
                        RequestLog.created_at < cursor.created_at,
                        sa.and_(RequestLog.created_at == cursor.created_at, RequestLog.id < cursor.id),
                    ))
                else:
                    q = q.where(RequestLog.created_at < as_utc(before))
            if since is not None:
                q = q.where(RequestLog.created_at >= as_utc(since))
            if status is not None:
                q = q.where(_status_clause(status))
            if model:
                q = q.where(sa.or_(RequestLog.model_requested == model, RequestLog.model_served == model))
            if key_id:
                q = q.where(RequestLog.key_id == key_id)
            return [_log_dict(r) for r in s.exec(q.order_by(*order).limit(limit))]

    def purge_logs(self, older_than: datetime | str) -> int:
        cutoff = as_utc(older_than)
        with self.engine.begin() as conn:
            result = conn.execute(sa.delete(RequestLog.__table__).where(RequestLog.created_at < cutoff))
            return int(result.rowcount or 0)

    # ---------------------------------------------------------------- audit and risk events

    def add_audit(
        self,
        actor: str,
        action: str,
        target_type: str,
        target_id: str | None = None,
        account_id: str | None = None,
        before: Any = None,
        after: Any = None,
    ) -> dict[str, Any]:
        with self._session() as s, s.begin():
            row = self._audit(s, actor, action, target_type, target_id, account_id, before, after)
            s.flush()
            return _audit_dict(row)

    def list_audit(self, limit: int = 50, account_id: str | None = None) -> list[dict[str, Any]]:
        limit = max(1, min(int(limit), 1000))
        q = select(AuditLog)
        if account_id:
            q = q.where(AuditLog.account_id == account_id)
        with self._session() as s:
            rows = s.exec(q.order_by(AuditLog.created_at.desc(), AuditLog.id.desc()).limit(limit))
            return [_audit_dict(a) for a in rows]

    def add_risk_event(
        self, account_id: str, kind: str, key_id: str | None = None, detail: Any = None
    ) -> dict[str, Any]:
        with self._session() as s, s.begin():
            row = RiskEvent(account_id=account_id, key_id=key_id, kind=kind, detail=redact(detail))
            s.add(row)
            s.flush()
            return _risk_event_dict(row)

    def add_risk_events(self, rows: list[dict[str, Any]]) -> None:
        """Batch insert of recorded events ({account_id, kind, key_id?, detail?, event_id?,
        created_at?}); an ``event_id`` already stored is skipped, so a redelivered batch writes once."""
        data = []
        for row in rows:
            if not row.get("account_id") or not row.get("kind"):
                log.error("risk event skipped (no account or kind): %r", row)
                continue
            try:
                created = as_utc(row.get("created_at")) or utcnow()
            except (InvalidRequest, ValueError, OverflowError, OSError):
                created = utcnow()
            data.append({"account_id": str(row["account_id"])[:64], "key_id": row.get("key_id"),
                         "kind": str(row["kind"])[:64], "detail": redact(row.get("detail")),
                         "event_id": row.get("event_id"), "created_at": created})
        if not data:
            return
        stmt = self._insert(RiskEvent.__table__).on_conflict_do_nothing(index_elements=["event_id"])
        with self.engine.begin() as conn:
            conn.execute(stmt, data)

    def list_risk_events(self, account_id: str | None, limit: int = 50) -> list[dict[str, Any]]:
        limit = max(1, min(int(limit), 1000))
        q = select(RiskEvent)
        if account_id:
            q = q.where(RiskEvent.account_id == account_id)
        with self._session() as s:
            rows = s.exec(q.order_by(RiskEvent.created_at.desc(), RiskEvent.id.desc()).limit(limit))
            return [_risk_event_dict(e) for e in rows]


def _parse_ts(text: str) -> datetime | None:
    try:
        return as_utc(text)
    except InvalidRequest:
        return None


def _status_clause(status: int | str) -> Any:
    text = str(status).strip().lower()
    if text == "ok":
        return RequestLog.status < 400
    if text == "error":
        return RequestLog.status >= 400
    if len(text) == 3 and text.endswith("xx") and text[0].isdigit():
        base = int(text[0]) * 100
        return sa.and_(RequestLog.status >= base, RequestLog.status < base + 100)
    try:
        return RequestLog.status == int(text)
    except ValueError:
        raise InvalidRequest(f"invalid status filter {status!r}", param="status") from None


