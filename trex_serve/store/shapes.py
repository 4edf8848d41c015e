"""Shapes shared by the store: validation of operator input, row-to-dict views, redaction, and
the auth snapshot of a key."""


from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trex_serve.errors import InvalidRequest
from trex_serve.store.models import (
    MICRO,
    Account,
    ApiKey,
    AuditLog,
    LedgerEntry,
    RequestLog,
    RiskEvent,
    utcnow,
)
from trex_serve.store.risk_settings import normalize_risk

log = logging.getLogger("trex.store")

ACCOUNT_STATES = ("active", "suspended")
SUBSCRIPTION_STATES = ("trialing", "active", "past_due", "canceled")
KEY_STATES = ("active", "inactive", "suspended", "revoked")
BILLING_POLICIES = ("reject", "downgrade")
LEDGER_KINDS = ("grant", "charge", "refund", "adjust")

_ACCOUNT_FIELDS = {"name", "plan", "state", "subscription_state", "grace_until", "risk", "log_content"}
_KEY_FIELDS = {"name", "state", "expires_at", "limits", "models", "risk", "billing_policy", "cache_ttl_s"}
_LOG_COLUMNS = {c.name for c in RequestLog.__table__.columns} - {"id"}
_LEDGER_COLUMNS = {c.name for c in LedgerEntry.__table__.columns} - {"id"}
_SECRET_FIELDS = {"key_hash", "encrypted_key", "key", "owner_token", "token_hash"}



def _string_lengths(table: sa.Table) -> dict[str, int]:
    return {c.name: c.type.length for c in table.columns if getattr(c.type, "length", None)}


_LOG_LENGTHS = _string_lengths(RequestLog.__table__)
_LEDGER_LENGTHS = _string_lengths(LedgerEntry.__table__)


def _clip(item: dict[str, Any], lengths: dict[str, int]) -> dict[str, Any]:
    """Cut over-long text to its column size so one odd row never fails a whole batch."""
    for name, size in lengths.items():
        value = item.get(name)
        if value is not None and not isinstance(value, str):
            value = str(value)
        item[name] = value[:size] if isinstance(value, str) else value
    return item


# --------------------------------------------------------------------------- helpers


def as_utc(value: datetime | str | float | None) -> datetime | None:
    """Parse/normalise to an aware UTC datetime (naive values are taken as UTC; numbers are epoch
    seconds)."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            value = datetime.fromisoformat(text)
        except ValueError as exc:
            raise InvalidRequest(f"invalid timestamp {value!r}") from exc
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _iso(value: datetime | None) -> str | None:
    value = as_utc(value)
    return value.isoformat().replace("+00:00", "Z") if value else None


def credits(micro: int | None) -> float:
    """Micro-credits -> credits."""
    return (micro or 0) / MICRO


def to_micro(amount_credits: float) -> int:
    return int(round(float(amount_credits) * MICRO))


class KeyLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rpm: int | None = Field(default=None, ge=0)
    tpm: int | None = Field(default=None, ge=0)
    concurrency: int | None = Field(default=None, ge=0)


def _pydantic_400(exc: ValidationError, prefix: str) -> InvalidRequest:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    param = f"{prefix}.{loc}" if loc else prefix
    return InvalidRequest(f"Invalid value for '{param}': {err.get('msg', 'invalid value')}", param=param)


def _risk(value: Any, param: str = "risk") -> dict[str, Any] | None:
    try:
        return normalize_risk(value)
    except ValidationError as exc:
        raise _pydantic_400(exc, param) from None


def _limits(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        data = KeyLimits.model_validate(value).model_dump(exclude_none=True)
    except ValidationError as exc:
        raise _pydantic_400(exc, "limits") from None
    return data or None


def _models(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(m, str) and m.strip() for m in value):
        raise InvalidRequest("models must be a list of model ids (or null for all)", param="models")
    return list(dict.fromkeys(m.strip() for m in value))


def _choice(value: Any, allowed: tuple[str, ...], param: str) -> str:
    if value not in allowed:
        raise InvalidRequest(f"{param} must be one of {', '.join(allowed)}", param=param)
    return value


# The longest time-to-live a request or a key may ask of the response cache: an entry is a copy of
# an answer, kept no longer than a stored response is by default.
MAX_CACHE_TTL_S = 30 * 86400


def _cache_ttl(value: Any) -> int | None:
    """A key's default response-cache time-to-live in seconds; 0 or None turns the default off."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_CACHE_TTL_S:
        raise InvalidRequest(f"cache_ttl_s must be an integer from 0 to {MAX_CACHE_TTL_S}", param="cache_ttl_s")
    return value or None


def redact(data: Any) -> Any:
    """Drop secret fields (hashes, encrypted or plaintext keys, tokens) from an audit payload."""
    if isinstance(data, dict):
        return {k: redact(v) for k, v in data.items() if k not in _SECRET_FIELDS}
    if isinstance(data, list):
        return [redact(v) for v in data]
    return data


def _account_dict(a: Account) -> dict[str, Any]:
    return {
        "id": a.id,
        "object": "account",
        "name": a.name,
        "plan": a.plan,
        "state": a.state,
        "subscription_state": a.subscription_state,
        "grace_until": _iso(a.grace_until),
        "risk": a.risk,
        "log_content": bool(a.log_content),
        "created_at": _iso(a.created_at),
    }


def _key_dict(k: ApiKey) -> dict[str, Any]:
    return {
        "id": k.id,
        "object": "api_key",
        "account_id": k.account_id,
        "name": k.name,
        "prefix": k.prefix,
        "state": k.state,
        "expires_at": _iso(k.expires_at),
        "limits": k.limits,
        "models": k.models,
        "risk": k.risk,
        "billing_policy": k.billing_policy,
        "cache_ttl_s": k.cache_ttl_s,
        "created_at": _iso(k.created_at),
    }


def _ledger_dict(e: LedgerEntry) -> dict[str, Any]:
    return {
        "id": e.id,
        "account_id": e.account_id,
        "key_id": e.key_id,
        "request_id": e.request_id,
        "kind": e.kind,
        "amount_micro": int(e.amount),
        "amount": credits(e.amount),
        "reason": e.reason,
        "tokens": e.tokens,
        "created_at": _iso(e.created_at),
    }


def _log_dict(r: RequestLog) -> dict[str, Any]:
    return {
        "id": r.id,
        "request_id": r.request_id,
        "account_id": r.account_id,
        "key_id": r.key_id,
        "key_prefix": r.key_prefix,
        "created_at": _iso(r.created_at),
        "api": r.api,
        "model_requested": r.model_requested,
        "provider": r.provider,
        "model_served": r.model_served,
        "attempts": r.attempts,
        "status": r.status,
        "error_code": r.error_code,
        "latency_ms": r.latency_ms,
        "ttfb_ms": r.ttfb_ms,
        "tokens_in": r.tokens_in,
        "tokens_out": r.tokens_out,
        "tokens": {"input": r.tokens_in - r.tokens_cache_read - r.tokens_cache_write - r.tokens_cache_write_1h,
                   "cache_read": r.tokens_cache_read, "cache_write": r.tokens_cache_write,
                   "cache_write_1h": r.tokens_cache_write_1h, "output": r.tokens_out,
                   "reasoning": r.tokens_reasoning},
        "billing": r.billing,
        "credits_charged_micro": int(r.credits_charged or 0),
        "credits_charged": credits(r.credits_charged),
        "stream": bool(r.stream),
        "cache": r.cache,  # the response cache's verdict: "hit" (answered from it), "miss", or None
        "prompt_text": r.prompt_text,
        "completion_text": r.completion_text,
    }


def _audit_dict(a: AuditLog) -> dict[str, Any]:
    return {
        "id": a.id,
        "created_at": _iso(a.created_at),
        "actor": a.actor,
        "action": a.action,
        "target_type": a.target_type,
        "target_id": a.target_id,
        "account_id": a.account_id,
        "before": a.before,
        "after": a.after,
    }


def _risk_event_dict(e: RiskEvent) -> dict[str, Any]:
    return {
        "id": e.id,
        "created_at": _iso(e.created_at),
        "account_id": e.account_id,
        "key_id": e.key_id,
        "kind": e.kind,
        "detail": e.detail,
    }


def _applies(key_ids: list[str] | None, key_id: str | None) -> bool:
    return key_ids is None or (key_id is not None and key_id in key_ids)


# --------------------------------------------------------------------------- auth snapshot


@dataclass(frozen=True)
class KeyContext:
    """Everything admission needs about a key, from one indexed query."""

    key_id: str
    prefix: str
    state: str
    expires_at: datetime | None
    limits: dict[str, Any] | None
    models: tuple[str, ...] | None
    risk: dict[str, Any] | None
    billing_policy: str
    account_id: str
    account_state: str
    subscription_state: str
    grace_until: datetime | None
    plan: str
    account_risk: dict[str, Any] | None
    log_content: bool
    bound_providers: frozenset[str] = field(default_factory=frozenset)
    name: str | None = None
    cache_ttl_s: int | None = None  # the response cache's default for this key (None: off)

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or utcnow())

    def in_grace(self, now: datetime | None = None) -> bool:
        return self.grace_until is not None and self.grace_until > (now or utcnow())
