"""SQLModel tables of the control plane. All timestamps are UTC (timezone-aware on PostgreSQL;
stored as UTC and re-tagged on read for SQLite). Money is in micro-credits (1 credit = 1_000_000)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

MICRO = 1_000_000

# BIGINT autoincrement primary keys, INTEGER on SQLite (which only autoincrements INTEGER PRIMARY KEY).
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


def _ts(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=nullable))


def _json(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=sa.Column(sa.JSON(), nullable=nullable))


def _pk_id() -> Any:
    return Field(default=None, sa_column=sa.Column(BigId, primary_key=True, autoincrement=True))


class PlanRow(SQLModel, table=True):
    __tablename__ = "plans"
    name: str = Field(primary_key=True, max_length=64)
    settings: dict[str, Any] | None = _json()


class Account(SQLModel, table=True):
    __tablename__ = "accounts"
    id: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=200)
    plan: str = Field(max_length=64)
    state: str = Field(default="active", max_length=16)
    subscription_state: str = Field(default="active", max_length=16)
    grace_until: datetime | None = _ts(nullable=True)
    risk: dict[str, Any] | None = _json()
    log_content: bool = Field(default=False)
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False)
    )


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"
    id: str = Field(primary_key=True, max_length=64)
    account_id: str = Field(foreign_key="accounts.id", index=True, max_length=64)
    name: str | None = Field(default=None, max_length=200)
    prefix: str = Field(max_length=32)
    key_hash: str = Field(max_length=64, unique=True, index=True)
    state: str = Field(default="active", max_length=16)
    expires_at: datetime | None = _ts(nullable=True)
    limits: dict[str, Any] | None = _json()
    models: list[str] | None = _json()
    risk: dict[str, Any] | None = _json()
    billing_policy: str = Field(default="reject", max_length=16)
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False)
    )
    # The response cache's default time-to-live for this key's requests (None: off unless asked).
    cache_ttl_s: int | None = Field(default=None)


class ProviderBinding(SQLModel, table=True):
    __tablename__ = "provider_bindings"
    __table_args__ = (sa.UniqueConstraint("account_id", "provider", name="uq_binding_account_provider"),)
    id: str = Field(primary_key=True, max_length=64)
    account_id: str = Field(foreign_key="accounts.id", index=True, max_length=64)
    provider: str = Field(max_length=64)
    encrypted_key: str = Field(sa_column=sa.Column(sa.Text(), nullable=False))
    key_ids: list[str] | None = _json()
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False)
    )
    updated_at: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False)
    )


class LedgerEntry(SQLModel, table=True):
    __tablename__ = "ledger"
    __table_args__ = (sa.UniqueConstraint("request_id", "kind", name="uq_ledger_request_kind"),)
    id: int | None = _pk_id()
    account_id: str = Field(index=True, max_length=64)
    key_id: str | None = Field(default=None, max_length=64)
    request_id: str | None = Field(default=None, max_length=128)
    kind: str = Field(max_length=16)
    amount: int = Field(sa_column=sa.Column(sa.BigInteger(), nullable=False))
    reason: str | None = Field(default=None, max_length=500)
    tokens: dict | None = _json()  # a charge's tokens by class (providers/usage.py Usage.classes())
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False, index=True)
    )


class RequestLog(SQLModel, table=True):
    __tablename__ = "request_logs"
    __table_args__ = (sa.Index("ix_request_logs_account_created", "account_id", "created_at"),)
    id: int | None = _pk_id()
    request_id: str = Field(max_length=128, unique=True, index=True)
    account_id: str = Field(max_length=64)  # covered by ix_request_logs_account_created
    key_id: str | None = Field(default=None, max_length=64)
    key_prefix: str | None = Field(default=None, max_length=32)
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False, index=True)
    )
    # The route: chat, responses, messages (Anthropic's Messages API), count_tokens; None before 0004.
    api: str | None = Field(default=None, max_length=32)
    model_requested: str | None = Field(default=None, max_length=256)
    provider: str | None = Field(default=None, max_length=64)
    model_served: str | None = Field(default=None, max_length=256)
    attempts: int = Field(default=0)
    status: int = Field(default=0)
    error_code: str | None = Field(default=None, max_length=64)
    latency_ms: float = Field(default=0.0)
    ttfb_ms: float | None = Field(default=None)
    tokens_in: int = Field(default=0)  # every input token, whatever its class
    tokens_out: int = Field(default=0)  # every output token, reasoning included
    # The classes within those totals (what each is billed at: docs/BILLING.md).
    tokens_cache_read: int = Field(default=0)
    tokens_cache_write: int = Field(default=0)
    tokens_cache_write_1h: int = Field(default=0)
    tokens_reasoning: int = Field(default=0)
    billing: str | None = Field(default=None, max_length=16)
    credits_charged: int = Field(default=0, sa_column=sa.Column(sa.BigInteger(), nullable=False))
    stream: bool = Field(default=False)
    prompt_text: str | None = Field(default=None, sa_column=sa.Column(sa.Text(), nullable=True))
    completion_text: str | None = Field(default=None, sa_column=sa.Column(sa.Text(), nullable=True))
    # The response cache's verdict: "hit" (answered from the cache, nothing upstream) or "miss"; None
    # when the request did not use the cache (and for rows before 0005).
    cache: str | None = Field(default=None, max_length=8)


class AuditLog(SQLModel, table=True):
    __tablename__ = "audit_log"
    id: int | None = _pk_id()
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False, index=True)
    )
    actor: str = Field(max_length=64)
    action: str = Field(max_length=64)
    target_type: str = Field(max_length=32)
    target_id: str | None = Field(default=None, max_length=128)
    account_id: str | None = Field(default=None, index=True, max_length=64)
    before: dict[str, Any] | None = _json()
    after: dict[str, Any] | None = _json()


class RiskEvent(SQLModel, table=True):
    __tablename__ = "risk_events"
    id: int | None = _pk_id()
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False, index=True)
    )
    account_id: str = Field(index=True, max_length=64)
    key_id: str | None = Field(default=None, max_length=64)
    kind: str = Field(max_length=64)
    detail: dict[str, Any] | None = _json()
    # Set by the gateway when it records the event, so a redelivered stream entry is written once.
    event_id: str | None = Field(default=None, sa_column=sa.Column(sa.String(64), nullable=True, unique=True,
                                                                  index=True))


class OwnerToken(SQLModel, table=True):
    __tablename__ = "owner_tokens"
    token_hash: str = Field(primary_key=True, max_length=64)
    account_id: str = Field(foreign_key="accounts.id", index=True, max_length=64)


class StoredResponse(SQLModel, table=True):
    """A Responses API answer kept for ``GET /v1/responses/{id}`` and ``previous_response_id``
    (trex_serve/conversations/). ``content`` (the input items and the response object) is encrypted
    with TREX_SECRET_KEY as provider keys are; in the clear only what lookups and expiry need. The
    key is (account, id): another account's id is simply not there."""

    __tablename__ = "stored_responses"
    __table_args__ = (sa.Index("ix_stored_responses_expires_at", "expires_at"),)
    account_id: str = Field(primary_key=True, max_length=64)
    id: str = Field(primary_key=True, max_length=128)
    previous_response_id: str | None = Field(default=None, max_length=128)
    key_id: str | None = Field(default=None, max_length=64)
    request_id: str | None = Field(default=None, max_length=128)
    model: str | None = Field(default=None, max_length=256)
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False)
    )
    expires_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    content: str = Field(sa_column=sa.Column(sa.Text(), nullable=False))


metadata = SQLModel.metadata
TABLES = [
    PlanRow, Account, ApiKey, ProviderBinding, LedgerEntry, RequestLog, AuditLog, RiskEvent, OwnerToken,
    StoredResponse,
]
