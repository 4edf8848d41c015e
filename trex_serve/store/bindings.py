"""Provider bindings of an account (part of Repository)."""


from __future__ import annotations

from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import select

import trex_serve.store.keys as keygen
from trex_serve.errors import InvalidRequest, NotFound
from trex_serve.store.crypto import mask
from trex_serve.store.models import (
    Account,
    ApiKey,
    ProviderBinding,
    utcnow,
)
from trex_serve.store.shapes import (
    _applies,
    _iso,
)


class BindingsMixin:
    """Provider bindings: provider keys encrypted at rest, shown masked."""


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
        """Re-encrypt every binding with the first secret; returns how many were rewritten."""
        with self._session() as s, s.begin():
            rows = s.exec(select(ProviderBinding).with_for_update()).all()
            for row in rows:
                row.encrypted_key = self.box.rotate_token(row.encrypted_key)
            return len(rows)
