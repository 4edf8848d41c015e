"""The synchronous control-plane repository.

Thread-safe: every method opens its own Session and runs one transaction, so async callers wrap
calls with ``asyncio.to_thread``. Every control-plane change writes its audit row (secrets
redacted) in the same transaction as the change. Amounts are micro-credits (1 credit = 1_000_000).
"""


from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from trex_serve.errors import InvalidRequest
from trex_serve.store.accounts_and_keys import AccountsAndKeysMixin
from trex_serve.store.bindings import BindingsMixin
from trex_serve.store.crypto import SecretBox
from trex_serve.store.history import HistoryMixin
from trex_serve.store.models import AuditLog, PlanRow

# Re-exported: callers import these shapes from here (web/admin_api.py, billing/balances.py, ...).
from trex_serve.store.shapes import (
    ACCOUNT_STATES,
    BILLING_POLICIES,
    KEY_STATES,
    SUBSCRIPTION_STATES,
    KeyContext,
    KeyLimits,
    as_utc,
    credits,
    redact,
    to_micro,
)

# --------------------------------------------------------------------------- repository


class Repository(AccountsAndKeysMixin, BindingsMixin, HistoryMixin):
    def __init__(self, engine: Engine, secret_key: str) -> None:
        self.engine = engine
        self.box = SecretBox(secret_key)

    def _session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    @property
    def _dialect(self) -> str:
        return self.engine.dialect.name

    def _insert(self, table: sa.Table) -> Any:
        if self._dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif self._dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:  # pragma: no cover - only SQLite and PostgreSQL are supported
            raise RuntimeError(f"unsupported database dialect {self._dialect}")
        return insert(table)

    @staticmethod
    def _audit(
        s: Session,
        actor: str,
        action: str,
        target_type: str,
        target_id: str | None,
        account_id: str | None,
        before: Any = None,
        after: Any = None,
    ) -> AuditLog:
        row = AuditLog(
            actor=actor,
            action=action,
            target_type=target_type,
            target_id=target_id,
            account_id=account_id,
            before=redact(before),
            after=redact(after),
        )
        s.add(row)
        return row

    # ---------------------------------------------------------------- plans

    def sync_plans(self, plans: Iterable[dict[str, Any]]) -> None:
        """Mirror the catalog's ``plans:`` (upsert each, drop plans no longer listed)."""
        plans = [dict(p) for p in plans]
        names = {p["name"] for p in plans}
        with self._session() as s, s.begin():
            existing = {p.name: p for p in s.exec(select(PlanRow)).all()}
            for plan in plans:
                row = existing.get(plan["name"])
                if row is None:
                    s.add(PlanRow(name=plan["name"], settings=plan))
                elif row.settings != plan:
                    row.settings = plan
            for name, row in existing.items():
                if name not in names:
                    s.delete(row)

    def list_plans(self) -> list[dict[str, Any]]:
        with self._session() as s:
            rows = s.exec(select(PlanRow).order_by(PlanRow.name))
            return [dict(p.settings or {}, name=p.name) for p in rows]

    def _check_plan(self, s: Session, plan: Any) -> str:
        if not isinstance(plan, str) or s.get(PlanRow, plan) is None:
            known = ", ".join(s.exec(select(PlanRow.name)).all()) or "none configured"
            raise InvalidRequest(f"Unknown plan {plan!r} (known: {known})", param="plan")
        return plan

    def default_plan(self) -> str | None:
        with self._session() as s:
            names = list(s.exec(select(PlanRow.name).order_by(PlanRow.name)).all())
        if "free" in names:
            return "free"
        return names[0] if names else None


__all__ = [
    "ACCOUNT_STATES",
    "BILLING_POLICIES",
    "KEY_STATES",
    "SUBSCRIPTION_STATES",
    "KeyContext",
    "KeyLimits",
    "Repository",
    "as_utc",
    "credits",
    "redact",
    "to_micro",
]
