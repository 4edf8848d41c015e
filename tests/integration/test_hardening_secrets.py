"""Hardening: secrets never leak. Provider keys (bound, per-request override, operator-managed) and
Trex API keys must not appear in any answer, table, metric, operator output or log line; API keys
are stored only as hashes; provider keys only encrypted, and TREX_SECRET_KEY rotates end to end."""

from __future__ import annotations

import hashlib
import logging

import pytest
import sqlalchemy as sa

from tests.integration.gateway import OP, account, new_key
from trex_serve.store import crypto
from trex_serve.store.repository import Repository

BOUND = "sk-bound-7f3a9c1e5d2b8a4f6e0c"
OVERRIDE = "sk-override-1a2b3c4d5e6f7a8b9c0d"
MANAGED = "sk-managed-9e8d7c6b5a4f3e2d1c0b"
SECRETS = (BOUND, OVERRIDE, MANAGED)


def _pieces(secret: str) -> list[str]:
    """The secret and long fragments of it (a partial quote leaks almost as much)."""
    return [secret, secret[:16], secret[-12:]]


def assert_clean(text: str, secrets, where: str) -> None:
    for secret in secrets:
        for piece in _pieces(secret):
            assert piece not in text, f"{piece!r} leaked in {where}: ...{text[max(0, text.find(piece) - 80):][:200]}"


class Recorder:
    """Wraps the test client: remembers every answer (status, headers, body) for the final grep."""

    def __init__(self, gw):
        self.gw = gw
        self.seen: list[str] = []

    async def __call__(self, method, path, **kw):
        r = await self.gw.request(method, path, **kw)
        self.seen.append(f"{method} {path} {r.status_code}\n{dict(r.headers)}\n{r.text}")
        return r


async def test_no_secret_leaks_anywhere(gw, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("TREX_TEST_UNSET_PROVIDER_KEY", MANAGED)
    rec = Recorder(gw)
    alpha = gw.mocks["alpha"]

    acc = await account(gw, credits=10)
    key = await new_key(gw, acc)              # the creation answer is the one place the key is shown
    other = await account(gw, credits=10)
    other_key = await new_key(gw, other)
    api_keys = (key["key"], other_key["key"])
    auth = {"Authorization": f"Bearer {key['key']}"}
    r = await rec("PUT", f"/admin/v1/accounts/{acc['id']}/bindings/byok", json={"api_key": BOUND}, headers=OP)
    assert r.status_code == 200, r.text
    chat_body = {"model": "byok-model", "messages": [{"role": "user", "content": "hi"}]}

    # Bound key, override key, managed key: each really reaches the upstream.
    r = await rec("POST", "/v1/chat/completions", json=chat_body, headers=auth)
    assert r.status_code == 200 and alpha.stats()["last_auth"] == f"Bearer {BOUND}"
    r = await rec("POST", "/v1/chat/completions", json={**chat_body, "model": "gpt-4o-mini"},
                  headers={**auth, "X-Upstream-Api-Key": OVERRIDE})
    assert r.status_code == 200 and alpha.stats()["last_auth"] == f"Bearer {OVERRIDE}"
    other_auth = {"Authorization": f"Bearer {other_key['key']}"}
    r = await rec("POST", "/v1/chat/completions", json=chat_body, headers=other_auth)
    assert r.status_code == 200 and alpha.stats()["last_auth"] == f"Bearer {MANAGED}"
    r = await rec("POST", "/v1/chat/completions", json={**chat_body, "stream": True}, headers=auth)
    assert r.status_code == 200

    # Failing upstream calls whose error messages quote the key they received.
    alpha.control(require_key="sk-something-else-entirely", echo_key_in_errors=True)
    mini = {**chat_body, "model": "gpt-4o-mini"}
    for headers, body in ((auth, chat_body), ({**auth, "X-Upstream-Api-Key": OVERRIDE}, mini),
                          (other_auth, chat_body),
                          ({**auth, "X-Upstream-Api-Key": OVERRIDE}, {**chat_body, "stream": True})):
        r = await rec("POST", "/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401, r.text
    alpha.control(require_key=None, fail_next=3, error_status=500)
    r = await rec("POST", "/v1/chat/completions", json=chat_body, headers=auth)
    assert r.status_code in (502, 503)
    alpha.control(fail_next=0, latency_ms=0, reset_rate=1.0)
    r = await rec("POST", "/v1/chat/completions", json=chat_body, headers={**auth, "X-Upstream-Api-Key": OVERRIDE})
    assert r.status_code in (502, 503)
    alpha.control(reset_rate=0.0)
    # The Trex key itself in a few wrong places.
    r = await rec("POST", "/v1/chat/completions", json=chat_body, headers={"Authorization": f"Bearer {key['key']}x"})
    assert r.status_code == 401
    r = await rec("POST", "/v1/responses", json={"model": "byok-model", "input": "hi"}, headers=auth)
    assert r.status_code == 200
    r = await rec("GET", "/v1/models", headers=auth)
    assert r.status_code == 200

    for w in (gw.runtime.logs, gw.runtime.ledger, gw.runtime.risk_events):
        await w.flush_once()

    # Every operator output.
    for path in (f"/admin/v1/accounts/{acc['id']}", f"/admin/v1/accounts/{acc['id']}/keys",
                 f"/admin/v1/keys/{key['id']}", f"/admin/v1/accounts/{acc['id']}/bindings",
                 f"/admin/v1/accounts/{acc['id']}/logs?limit=100", f"/admin/v1/accounts/{acc['id']}/usage",
                 f"/admin/v1/accounts/{acc['id']}/ledger", "/admin/v1/audit?limit=200",
                 f"/admin/v1/accounts/{acc['id']}/risk-events?limit=100", "/admin/v1/accounts", "/metrics"):
        r = await rec("GET", path, headers=OP)
        assert r.status_code == 200, (path, r.text[:200])
    # The upstream's quoted key reached the pool and was cut there.
    assert any("[redacted]" in text for text in rec.seen)

    for text in rec.seen:
        assert_clean(text, SECRETS + api_keys, text.split("\n", 1)[0])

    # Raw tables.
    with gw.runtime.repo.engine.connect() as conn:
        for table in ("request_logs", "audit_log", "risk_events", "ledger", "accounts", "api_keys",
                      "provider_bindings"):
            rows = conn.execute(sa.text(f"SELECT * FROM {table}")).fetchall()
            assert_clean(repr(rows), SECRETS + api_keys, f"table {table}")
        hashes = {row[0] for row in conn.execute(sa.text("SELECT key_hash FROM api_keys"))}
        for plaintext in api_keys:
            assert hashlib.sha256(plaintext.encode()).hexdigest() in hashes, "API keys are stored as SHA-256"
        encrypted = conn.execute(sa.text("SELECT encrypted_key FROM provider_bindings")).scalar()
        assert encrypted and BOUND not in encrypted

    # Every log line, at DEBUG, including exception text.
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records)
    assert_clean(logged + caplog.text, SECRETS + api_keys, "captured logs")


async def test_secret_key_rotation_end_to_end(gw):
    repo = gw.runtime.repo
    acc = await account(gw)
    key = await new_key(gw, acc)
    r = await gw.put(f"/admin/v1/accounts/{acc['id']}/bindings/byok", json={"api_key": BOUND}, headers=OP)
    assert r.status_code == 200
    engine = repo.engine
    old = Repository(engine, "test-secret")              # TREX_SECRET_KEY=old
    assert old.binding_secret(acc["id"], key["id"], "byok") == BOUND

    # Step 1: deploy TREX_SECRET_KEY="new,old": the new secret encrypts, both decrypt.
    both = Repository(engine, "new-secret-2,test-secret")
    assert both.binding_secret(acc["id"], key["id"], "byok") == BOUND
    # Step 2: re-encrypt every stored binding with the new secret.
    assert both.rotate_bindings() >= 1
    # Step 3: deploy TREX_SECRET_KEY="new": only the new secret is needed; the old one no longer works.
    new = Repository(engine, "new-secret-2")
    assert new.binding_secret(acc["id"], key["id"], "byok") == BOUND
    with pytest.raises(crypto.DecryptionError):
        old.binding_secret(acc["id"], key["id"], "byok")
    # Rotating twice is harmless.
    assert new.rotate_bindings() >= 1
    assert new.binding_secret(acc["id"], key["id"], "byok") == BOUND
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT encrypted_key FROM provider_bindings WHERE account_id = :a"),
                              {"a": acc["id"]}).scalar()
    assert BOUND not in stored
