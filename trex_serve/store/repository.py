"""The synchronous control-plane repository.

Thread-safe: every method opens its own Session and runs one transaction, so async callers wrap
calls with ``asyncio.to_thread``. Every control-plane change writes its audit row (secrets
redacted) in the same transaction as the change. Amounts are micro-credits (1 credit = 1_000_000).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from trex_serve.errors import Conflict, InvalidRequest, NotFound
from trex_serve.risk_settings import normalize_risk
from trex_serve.store import keys as keygen
from trex_serve.store.crypto import SecretBox, mask
from trex_serve.store.models import (
    MICRO,
    Account,
    ApiKey,
    AuditLog,
    LedgerEntry,
    OwnerToken,
    PlanRow,
    ProviderBinding,
    RequestLog,
    RiskEvent,
    utcnow,
)

log = logging.getLogger("trex.store")

ACCOUNT_STATES = ("active", "suspended")
SUBSCRIPTION_STATES = ("trialing", "active", "past_due", "canceled")
KEY_STATES = ("active", "inactive", "suspended", "revoked")
BILLING_POLICIES = ("reject", "downgrade")
LEDGER_KINDS = ("grant", "charge", "refund", "adjust")

_ACCOUNT_FIELDS = {"name", "plan", "state", "subscription_state", "grace_until", "risk", "log_content"}
_KEY_FIELDS = {"name", "state", "expires_at", "limits", "models", "risk", "billing_policy"}
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
        "billing": r.billing,
        "credits_charged_micro": int(r.credits_charged or 0),
        "credits_charged": credits(r.credits_charged),
        "stream": bool(r.stream),
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

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or utcnow())

    def in_grace(self, now: datetime | None = None) -> bool:
        return self.grace_until is not None and self.grace_until > (now or utcnow())


# --------------------------------------------------------------------------- repository


class Repository:
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

    # ---------------------------------------------------------------- accounts

    def create_account(
        self,
        name: str,
        plan: str,
        *,
        subscription_state: str = "active",
        risk: Any = None,
        log_content: bool = False,
        actor: str = "operator",
    ) -> dict[str, Any]:
        """Create an account and its owner token; the token is returned once as ``owner_token``."""
        if not isinstance(name, str) or not name.strip():
            raise InvalidRequest("name must be a non-empty string", param="name")
        _choice(subscription_state, SUBSCRIPTION_STATES, "subscription_state")
        risk_data = _risk(risk)
        token = keygen.generate_owner_token()
        with self._session() as s, s.begin():
            self._check_plan(s, plan)
            acc = Account(
                id=keygen.new_id("acc"),
                name=name.strip(),
                plan=plan,
                subscription_state=subscription_state,
                risk=risk_data,
                log_content=bool(log_content),
            )
            s.add(acc)
            s.flush()
            s.add(OwnerToken(token_hash=keygen.hash_key(token), account_id=acc.id))
            out = _account_dict(acc)
            self._audit(s, actor, "account.create", "account", acc.id, acc.id, None, out)
        return dict(out, owner_token=token)

    def get_account(self, account_id: str) -> dict[str, Any] | None:
        with self._session() as s:
            acc = s.get(Account, account_id)
            return _account_dict(acc) if acc else None

    def list_accounts(self, limit: int | None = None) -> list[dict[str, Any]]:
        with self._session() as s:
            q = select(Account).order_by(Account.created_at, Account.id)
            if limit:
                q = q.limit(limit)
            return [_account_dict(a) for a in s.exec(q)]

    def update_account(
        self, account_id: str, actor: str = "operator", **fields: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        unknown = set(fields) - _ACCOUNT_FIELDS
        if unknown:
            raise InvalidRequest(f"unknown field {sorted(unknown)[0]!r}", param=sorted(unknown)[0])
        with self._session() as s, s.begin():
            acc = s.get(Account, account_id, with_for_update=True)
            if acc is None:
                raise NotFound(f"No account {account_id!r}", param="account_id")
            before = _account_dict(acc)
            for name, value in fields.items():
                if name == "name":
                    if not isinstance(value, str) or not value.strip():
                        raise InvalidRequest("name must be a non-empty string", param="name")
                    acc.name = value.strip()
                elif name == "plan":
                    acc.plan = self._check_plan(s, value)
                elif name == "state":
                    acc.state = _choice(value, ACCOUNT_STATES, "state")
                elif name == "subscription_state":
                    acc.subscription_state = _choice(value, SUBSCRIPTION_STATES, "subscription_state")
                elif name == "grace_until":
                    acc.grace_until = as_utc(value)
                elif name == "risk":
                    acc.risk = _risk(value)
                elif name == "log_content":
                    if not isinstance(value, bool):
                        raise InvalidRequest("log_content must be a boolean", param="log_content")
                    acc.log_content = value
            s.flush()
            after = _account_dict(acc)
            if after != before:
                self._audit(s, actor, "account.update", "account", acc.id, acc.id, before, after)
        return before, after

    def lookup_owner_token(self, token: str) -> str | None:
        """The account id an owner token belongs to (for the account API), or None."""
        digest = keygen.hash_key(token)
        with self._session() as s:
            row = s.get(OwnerToken, digest)
            if row is None or not hmac.compare_digest(row.token_hash, digest):
                return None
            return row.account_id

    # ---------------------------------------------------------------- keys

    def create_key(
        self,
        account_id: str,
        name: str | None = None,
        limits: Any = None,
        models: Any = None,
        expires_at: datetime | str | None = None,
        risk: Any = None,
        billing_policy: str = "reject",
        *,
        actor: str = "operator",
    ) -> tuple[dict[str, Any], str]:
        """Create a key; returns ``(key_dict, plaintext)``: the plaintext is never stored."""
        if name is not None and not isinstance(name, str):
            raise InvalidRequest("name must be a string", param="name")
        limits_data = _limits(limits)
        models_data = _models(models)
        risk_data = _risk(risk)
        _choice(billing_policy, BILLING_POLICIES, "billing_policy")
        expires = as_utc(expires_at)
        plaintext = keygen.generate_api_key()
        with self._session() as s, s.begin():
            if s.get(Account, account_id) is None:
                raise NotFound(f"No account {account_id!r}", param="account_id")
            key = ApiKey(
                id=keygen.new_id("key"),
                account_id=account_id,
                name=name,
                prefix=keygen.key_prefix(plaintext),
                key_hash=keygen.hash_key(plaintext),
                expires_at=expires,
                limits=limits_data,
                models=models_data,
                risk=risk_data,
                billing_policy=billing_policy,
            )
            s.add(key)
            s.flush()
            out = _key_dict(key)
            self._audit(s, actor, "key.create", "api_key", key.id, account_id, None, out)
        return out, plaintext

    def get_key(self, key_id: str) -> dict[str, Any] | None:
        with self._session() as s:
            key = s.get(ApiKey, key_id)
            return _key_dict(key) if key else None

    def list_keys(self, account_id: str) -> list[dict[str, Any]]:
        with self._session() as s:
            if s.get(Account, account_id) is None:
                raise NotFound(f"No account {account_id!r}", param="account_id")
            q = select(ApiKey).where(ApiKey.account_id == account_id).order_by(ApiKey.created_at, ApiKey.id)
            return [_key_dict(k) for k in s.exec(q)]

    def update_key(
        self, key_id: str, actor: str = "operator", **fields: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Change a key. A revoked key is final: changing its state raises Conflict (409)."""
        unknown = set(fields) - _KEY_FIELDS
        if unknown:
            raise InvalidRequest(f"unknown field {sorted(unknown)[0]!r}", param=sorted(unknown)[0])
        with self._session() as s, s.begin():
            key = s.get(ApiKey, key_id, with_for_update=True)
            if key is None:
                raise NotFound(f"No API key {key_id!r}", param="key_id")
            before = _key_dict(key)
            for name, value in fields.items():
                if name == "state":
                    _choice(value, KEY_STATES, "state")
                    if key.state == "revoked" and value != "revoked":
                        raise Conflict("A revoked key cannot be reactivated; create a new key.",
                                       param="state")
                    key.state = value
                elif name == "name":
                    if value is not None and not isinstance(value, str):
                        raise InvalidRequest("name must be a string", param="name")
                    key.name = value
                elif name == "expires_at":
                    key.expires_at = as_utc(value)
                elif name == "limits":
                    key.limits = _limits(value)
                elif name == "models":
                    key.models = _models(value)
                elif name == "risk":
                    key.risk = _risk(value)
                elif name == "billing_policy":
                    key.billing_policy = _choice(value, BILLING_POLICIES, "billing_policy")
            s.flush()
            after = _key_dict(key)
            if after != before:
                self._audit(s, actor, "key.update", "api_key", key.id, key.account_id, before, after)
        return before, after

    def revoke_key(self, key_id: str, actor: str = "operator") -> dict[str, Any]:
        return self.update_key(key_id, actor=actor, state="revoked")[1]

    def auto_suspend_key(self, key_id: str, kind: str = "auto_suspended", detail: Any = None,
                         actor: str = "risk") -> bool:
        """Suspend a key for a risk control: state change + risk event + audit in one transaction.
        Returns False when the key was not active (nothing written)."""
        with self._session() as s, s.begin():
            key = s.get(ApiKey, key_id, with_for_update=True)
            if key is None or key.state != "active":
                return False
            before = _key_dict(key)
            key.state = "suspended"
            s.flush()
            s.add(RiskEvent(account_id=key.account_id, key_id=key.id, kind=kind, detail=detail))
            self._audit(s, actor, "key.suspend", "api_key", key.id, key.account_id, before, _key_dict(key))
        return True

    def lookup_key(self, plaintext: str) -> KeyContext | None:
        """The auth snapshot of a key, or None if unknown. One indexed query by hash (+ joins)."""
        if not plaintext or len(plaintext) > 512:
            return None
        digest = keygen.hash_key(plaintext)
        q = (
            select(ApiKey, Account, ProviderBinding.provider, ProviderBinding.key_ids)
            .join(Account, Account.id == ApiKey.account_id)
            .outerjoin(ProviderBinding, ProviderBinding.account_id == ApiKey.account_id)
            .where(ApiKey.key_hash == digest)
        )
        with self._session() as s:
            rows = s.exec(q).all()
        if not rows:
            return None
        key, acc = rows[0][0], rows[0][1]
        if not hmac.compare_digest(key.key_hash, digest):
            return None
        bound = frozenset(p for _, _, p, ids in rows if p is not None and _applies(ids, key.id))
        return KeyContext(
            key_id=key.id,
            prefix=key.prefix,
            state=key.state,
            expires_at=as_utc(key.expires_at),
            limits=key.limits,
            models=tuple(key.models) if key.models is not None else None,
            risk=key.risk,
            billing_policy=key.billing_policy,
            account_id=acc.id,
            account_state=acc.state,
            subscription_state=acc.subscription_state,
            grace_until=as_utc(acc.grace_until),
            plan=acc.plan,
            account_risk=acc.risk,
            log_content=bool(acc.log_content),
            bound_providers=bound,
            name=key.name,
        )

    # ---------------------------------------------------------------- provider bindings

    def _binding_dict(self, b: ProviderBinding) -> dict[str, Any]:
        try:
            masked = mask(self.box.decrypt(b.encrypted_key))
        except ValueError:
            masked = "…(undecryptable)"
        return {
            "id": b.id,
            "object": "provider_binding",
            "account_id": b.account_id,
            "provider": b.provider,
            "api_key": masked,
            "key_ids": b.key_ids,
            "created_at": _iso(b.created_at),
            "updated_at": _iso(b.updated_at),
        }

    def put_binding(
        self,
        account_id: str,
        provider: str,
        api_key: str,
        key_ids: list[str] | None = None,
        *,
        actor: str = "operator",
    ) -> dict[str, Any]:
        """Create or replace the account's key for ``provider`` (encrypted); returns it masked."""
        if not isinstance(provider, str) or not provider.strip():
            raise InvalidRequest("provider must be a non-empty string", param="provider")
        if not isinstance(api_key, str) or not api_key.strip():
            raise InvalidRequest("api_key must be a non-empty string", param="api_key")
        if key_ids is not None and (
            not isinstance(key_ids, list) or not all(isinstance(k, str) for k in key_ids)
        ):
            raise InvalidRequest("key_ids must be a list of key ids (or null for all keys)", param="key_ids")
        encrypted = self.box.encrypt(api_key.strip())
        for attempt in range(2):
            try:
                return self._put_binding(account_id, provider, encrypted, key_ids, actor)
            except IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _put_binding(self, account_id: str, provider: str, encrypted: str, key_ids: list[str] | None,
                     actor: str) -> dict[str, Any]:
        with self._session() as s, s.begin():
            if s.get(Account, account_id) is None:
                raise NotFound(f"No account {account_id!r}", param="account_id")
            if key_ids is not None:
                key_ids = list(dict.fromkeys(key_ids))
                found = set(
                    s.exec(select(ApiKey.id).where(ApiKey.account_id == account_id, ApiKey.id.in_(key_ids)))
                )
                missing = [k for k in key_ids if k not in found]
                if missing:
                    raise InvalidRequest(f"key_ids: {missing[0]!r} is not a key of this account",
                                         param="key_ids")
            row = s.exec(
                select(ProviderBinding)
                .where(ProviderBinding.account_id == account_id, ProviderBinding.provider == provider)
                .with_for_update()
            ).first()
            before = self._binding_dict(row) if row else None
            if row is None:
                row = ProviderBinding(id=keygen.new_id("bnd"), account_id=account_id, provider=provider,
                                      encrypted_key=encrypted, key_ids=key_ids)
                s.add(row)
            else:
                row.encrypted_key = encrypted
                row.key_ids = key_ids
                row.updated_at = utcnow()
            s.flush()
            after = self._binding_dict(row)
            self._audit(s, actor, "binding.put", "provider_binding", provider, account_id, before, after)
        return after

    def delete_binding(self, account_id: str, provider: str, *, actor: str = "operator") -> dict[str, Any]:
        with self._session() as s, s.begin():
            row = s.exec(
                select(ProviderBinding)
                .where(ProviderBinding.account_id == account_id, ProviderBinding.provider == provider)
            ).first()
            if row is None:
                raise NotFound(f"No {provider!r} binding on account {account_id!r}", param="provider")
            before = self._binding_dict(row)
            s.delete(row)
            self._audit(s, actor, "binding.delete", "provider_binding", provider, account_id, before, None)
        return before

    def list_bindings(self, account_id: str) -> list[dict[str, Any]]:
        with self._session() as s:
            if s.get(Account, account_id) is None:
                raise NotFound(f"No account {account_id!r}", param="account_id")
            q = select(ProviderBinding).where(ProviderBinding.account_id == account_id)
            return [self._binding_dict(b) for b in s.exec(q.order_by(ProviderBinding.provider))]

    def binding_secret(self, account_id: str, key_id: str | None, provider: str) -> str | None:
        """The decrypted provider key bound for this key, or None (no binding applies)."""
        with self._session() as s:
            row = s.exec(
                select(ProviderBinding)
                .where(ProviderBinding.account_id == account_id, ProviderBinding.provider == provider)
            ).first()
        if row is None or not _applies(row.key_ids, key_id):
            return None
        return self.box.decrypt(row.encrypted_key)

    def rotate_bindings(self) -> int:
        """Re-encrypt every binding with the first secret (see crypto.rotate)."""
        with self._session() as s, s.begin():
            rows = s.exec(select(ProviderBinding).with_for_update()).all()
            for row in rows:
                row.encrypted_key = self.box.rotate_token(row.encrypted_key)
            return len(rows)

    # ---------------------------------------------------------------- ledger

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

    def insert_logs(self, rows: list[dict[str, Any]]) -> None:
        """Batch insert; a row whose request_id already exists is skipped. Prompt/completion text is
        kept only for accounts that opted in (``log_content``). Unknown keys are ignored (so
        ``RequestRecord.row()`` can be passed as is); rows without an account (refused before
        authentication) are not stored; ``created_at`` may be a datetime, ISO text or epoch seconds."""
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
                                 ("tokens_out", 0), ("credits_charged", 0), ("stream", False)):
                if item.get(col) is None:
                    item[col] = default
            for col in _LOG_COLUMNS:
                item.setdefault(col, None)
            data.append(_clip(item, _LOG_LENGTHS))
        if not data:
            return
        with self.engine.begin() as conn:
            with_text = {d["account_id"] for d in data if d.get("prompt_text") or d.get("completion_text")}
            if with_text:
                opted = set(conn.execute(
                    sa.select(Account.id).where(Account.id.in_(with_text), Account.log_content.is_(True))
                ).scalars())
                for d in data:
                    if d["account_id"] not in opted:
                        d["prompt_text"] = d["completion_text"] = None
            stmt = self._insert(RequestLog.__table__).on_conflict_do_nothing(index_elements=["request_id"])
            conn.execute(stmt, data)

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
