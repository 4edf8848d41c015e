"""Accounts, their owner tokens and their API keys (part of Repository)."""


from __future__ import annotations

import hmac
from datetime import datetime
from typing import Any

from sqlmodel import select

import trex_serve.store.keys as keygen
from trex_serve.errors import Conflict, InvalidRequest, NotFound
from trex_serve.store.models import (
    Account,
    ApiKey,
    OwnerToken,
    ProviderBinding,
    RiskEvent,
)
from trex_serve.store.shapes import (
    _ACCOUNT_FIELDS,
    _KEY_FIELDS,
    ACCOUNT_STATES,
    BILLING_POLICIES,
    KEY_STATES,
    SUBSCRIPTION_STATES,
    KeyContext,
    _account_dict,
    _applies,
    _cache_ttl,
    _choice,
    _key_dict,
    _limits,
    _models,
    _risk,
    as_utc,
)


class AccountsAndKeysMixin:
    """Accounts (with the owner token each gets once) and their API keys, stored as hashes only."""

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
        cache_ttl_s: int | None = None,
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
        cache_ttl = _cache_ttl(cache_ttl_s)
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
                cache_ttl_s=cache_ttl,
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
                elif name == "cache_ttl_s":
                    key.cache_ttl_s = _cache_ttl(value)
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
            cache_ttl_s=key.cache_ttl_s,
        )
