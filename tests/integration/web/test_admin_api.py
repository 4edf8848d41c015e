"""The operator API end to end through FastAPI's TestClient, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from trex_serve.errors import TrexError
from trex_serve.store import Repository, create_engine, migrate
from trex_serve.web.admin_api import build_admin_router

TOKEN = "admin-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PLANS = [{"name": "free", "rpm": 60}, {"name": "pro", "rpm": 600, "premium": True}]


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        eng = create_engine(f"sqlite:///{tmp_path / 'admin.db'}")
        migrate(eng)
        yield eng
        eng.dispose()
        return
    pg = request.getfixturevalue("postgres_url")
    name = f"trex_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    eng = create_engine(make_url(pg).set(database=name).render_as_string(hide_password=False), pool_size=2)
    migrate(eng)
    yield eng
    eng.dispose()
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def ctx(engine):
    repo = Repository(engine, "admin-secret")
    repo.sync_plans(PLANS)
    changes: list[tuple[str, str]] = []
    granted: list[tuple[str, int]] = []

    async def on_change(kind: str, ident: str) -> None:
        changes.append((kind, ident))

    async def on_credits(account_id: str, amount: int) -> None:
        granted.append((account_id, amount))

    async def usage_extra(account_id: str) -> dict:
        # As Runtime._usage answers: the live quota, with the ledger's totals read alongside.
        return {"quota": {"requests_used": 3, "requests_left": 197},
                "ledger_totals": repo.ledger_totals(account_id)}

    app = FastAPI()

    @app.exception_handler(TrexError)
    async def _trex(request: Request, exc: TrexError) -> JSONResponse:
        return JSONResponse(exc.envelope("req_test"), status_code=exc.status, headers=exc.response_headers())

    app.include_router(build_admin_router(
        repo, TOKEN, on_change, usage_extra=usage_extra, on_credits=on_credits,
        known_providers=lambda: ["openai", "openrouter"],
    ))
    with TestClient(app) as client:
        yield client, repo, changes, granted


def _err(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert {"message", "type", "code", "param", "trex"} <= set(err)
    assert err["trex"]["request_id"] == "req_test"
    if code:
        assert err["code"] == code
    return err


def test_operator_auth(ctx):
    client, *_ = ctx
    _err(client.get("/admin/v1/accounts"), 401, "invalid_api_key")
    _err(client.get("/admin/v1/accounts", headers={"Authorization": "Bearer wrong"}), 401)
    _err(client.get("/admin/v1/accounts", headers={"Authorization": TOKEN}), 401)
    _err(client.post("/admin/v1/accounts", json={"name": "x"}), 401)
    assert client.get("/admin/v1/accounts", headers=AUTH).status_code == 200


def test_disabled_without_token(engine):
    app = FastAPI()

    @app.exception_handler(TrexError)
    async def _trex(request: Request, exc: TrexError) -> JSONResponse:
        return JSONResponse(exc.envelope("req_test"), status_code=exc.status)

    app.include_router(build_admin_router(Repository(engine, "s"), ""))
    with TestClient(app) as client:
        _err(client.get("/admin/v1/accounts", headers={"Authorization": "Bearer "}), 401)


def test_accounts_keys_end_to_end(ctx):
    client, repo, changes, _ = ctx
    r = client.post("/admin/v1/accounts", json={"name": "Acme", "plan": "free"}, headers=AUTH)
    assert r.status_code == 201, r.text
    acc = r.json()
    assert acc["id"].startswith("acc_") and acc["plan"] == "free" and acc["state"] == "active"
    assert acc["subscription_state"] == "active" and acc["owner_token"]
    aid = acc["id"]

    got = client.get(f"/admin/v1/accounts/{aid}", headers=AUTH).json()
    assert got["name"] == "Acme" and "owner_token" not in got
    assert [a["id"] for a in client.get("/admin/v1/accounts", headers=AUTH).json()["data"]] == [aid]

    # validation and lookups
    err = _err(client.post("/admin/v1/accounts", json={"name": "X", "plan": "gold"}, headers=AUTH),
               400, "invalid_request_error")
    assert err["param"] == "plan"
    err = _err(client.post("/admin/v1/accounts", json={"plan": "free"}, headers=AUTH), 400)
    assert err["param"] == "name"
    _err(client.post("/admin/v1/accounts", content=b"{not json", headers=AUTH), 400, "invalid_request_error")
    _err(client.get("/admin/v1/accounts/acc_nope", headers=AUTH), 404, "not_found")
    _err(client.patch("/admin/v1/accounts/acc_nope", json={"state": "suspended"}, headers=AUTH), 404)
    err = _err(client.patch(f"/admin/v1/accounts/{aid}", json={"state": "frozen"}, headers=AUTH), 400)
    assert err["param"] == "state"
    err = _err(client.patch(f"/admin/v1/accounts/{aid}", json={"risk": {"allowed_ips": ["999.1.1.1/8"]}},
                            headers=AUTH), 400)
    assert err["param"].startswith("risk.allowed_ips")
    err = _err(client.patch(f"/admin/v1/accounts/{aid}", json={"risk": {"alert_at": 2}}, headers=AUTH), 400)
    assert err["param"] == "risk.alert_at"
    err = _err(client.patch(f"/admin/v1/accounts/{aid}", json={"bogus": 1}, headers=AUTH), 400)
    assert err["param"] == "bogus"
    assert changes == []

    # key created: shown once
    r = client.post(f"/admin/v1/accounts/{aid}/keys",
                    json={"name": "ci", "limits": {"rpm": 10, "concurrency": 2}, "models": ["gpt-4o-mini"]},
                    headers=AUTH)
    assert r.status_code == 201, r.text
    key = r.json()
    plaintext = key["key"]
    assert key["id"].startswith("key_") and key["prefix"] == plaintext[:12]
    assert key["limits"] == {"rpm": 10, "concurrency": 2} and key["models"] == ["gpt-4o-mini"]
    listed = client.get(f"/admin/v1/accounts/{aid}/keys", headers=AUTH)
    assert plaintext not in listed.text and "key_hash" not in listed.text
    assert [k["id"] for k in listed.json()["data"]] == [key["id"]]
    assert "key" not in client.get(f"/admin/v1/keys/{key['id']}", headers=AUTH).json()
    assert repo.lookup_key(plaintext).limits == {"rpm": 10, "concurrency": 2}
    err = _err(client.post(f"/admin/v1/accounts/{aid}/keys", json={"limits": {"rpm": "many"}}, headers=AUTH),
               400)
    assert err["param"] == "limits.rpm"
    _err(client.post("/admin/v1/accounts/acc_nope/keys", json={}, headers=AUTH), 404)

    # key changes reach the auth snapshot and fire on_change
    changes.clear()
    r = client.patch(f"/admin/v1/keys/{key['id']}",
                     json={"state": "suspended", "risk": {"allowed_ips": ["203.0.113.7/24"]}}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "suspended" and r.json()["risk"] == {"allowed_ips": ["203.0.113.0/24"]}
    assert changes == [("key", key["id"])]
    assert repo.lookup_key(plaintext).state == "suspended"
    client.patch(f"/admin/v1/keys/{key['id']}", json={"state": "active", "limits": None}, headers=AUTH)
    assert repo.lookup_key(plaintext).limits is None
    _err(client.patch("/admin/v1/keys/key_nope", json={"state": "inactive"}, headers=AUTH), 404)
    err = _err(client.patch(f"/admin/v1/keys/{key['id']}", json={"state": None}, headers=AUTH), 400)
    assert err["param"] == "state"

    # account changes
    changes.clear()
    r = client.patch(f"/admin/v1/accounts/{aid}",
                     json={"state": "suspended", "subscription_state": "past_due", "plan": "pro",
                           "grace_until": "2030-01-01T00:00:00Z", "risk": {"daily_spend_cap": 5}},
                     headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["state"], body["subscription_state"], body["plan"]) == ("suspended", "past_due", "pro")
    assert body["grace_until"].startswith("2030-01-01T00:00:00") and body["risk"] == {"daily_spend_cap": 5.0}
    assert changes == [("account", aid)]
    snap = repo.lookup_key(plaintext)
    assert (snap.account_state, snap.subscription_state, snap.plan) == ("suspended", "past_due", "pro")

    # revoke is final
    r = client.patch(f"/admin/v1/keys/{key['id']}", json={"state": "revoked"}, headers=AUTH)
    assert r.json()["state"] == "revoked"
    _err(client.patch(f"/admin/v1/keys/{key['id']}", json={"state": "active"}, headers=AUTH), 409)

    # audit trail: newest first, operator actor, no secrets
    audit = client.get("/admin/v1/audit?limit=50", headers=AUTH)
    assert audit.status_code == 200
    rows = audit.json()["data"]
    assert rows[0]["action"] == "key.update" and rows[0]["actor"] == "operator"
    actions = {r["action"] for r in rows}
    assert {"account.create", "account.update", "key.create", "key.update"} <= actions
    assert plaintext not in audit.text and acc["owner_token"] not in audit.text
    assert "key_hash" not in audit.text
    assert len(client.get("/admin/v1/audit?limit=2", headers=AUTH).json()["data"]) == 2
    _err(client.get("/admin/v1/audit?limit=abc", headers=AUTH), 400)
    assert client.get("/admin/v1/plans", headers=AUTH).json()["data"][0]["name"] == "free"


def test_bindings(ctx):
    client, repo, changes, _ = ctx
    aid = client.post("/admin/v1/accounts", json={"name": "A", "plan": "free"}, headers=AUTH).json()["id"]
    key = client.post(f"/admin/v1/accounts/{aid}/keys", json={}, headers=AUTH).json()
    secret = "sk-live-TOPSECRET-0123456789-wxyz"
    changes.clear()
    r = client.put(f"/admin/v1/accounts/{aid}/bindings/openai", json={"api_key": secret}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["api_key"] == "sk-…wxyz" and secret not in r.text
    assert changes == [("account", aid)]
    # upsert, scoped to one key
    r = client.put(f"/admin/v1/accounts/{aid}/bindings/openai",
                   json={"api_key": secret + "2", "key_ids": [key["id"]]}, headers=AUTH)
    assert r.status_code == 200 and r.json()["key_ids"] == [key["id"]]
    listed = client.get(f"/admin/v1/accounts/{aid}/bindings", headers=AUTH)
    assert len(listed.json()["data"]) == 1 and secret not in listed.text
    assert repo.lookup_key(key["key"]).bound_providers == {"openai"}
    assert repo.binding_secret(aid, key["id"], "openai") == secret + "2"

    err = _err(client.put(f"/admin/v1/accounts/{aid}/bindings/nosuch", json={"api_key": "x"}, headers=AUTH),
               400)
    assert err["param"] == "provider"
    err = _err(client.put(f"/admin/v1/accounts/{aid}/bindings/openai", json={}, headers=AUTH), 400)
    assert err["param"] == "api_key"
    _err(client.put("/admin/v1/accounts/acc_nope/bindings/openai", json={"api_key": "x"}, headers=AUTH), 404)

    audit = client.get("/admin/v1/audit?limit=100", headers=AUTH).text
    assert secret not in audit and "TOPSECRET" not in audit and "binding.put" in audit

    assert client.delete(f"/admin/v1/accounts/{aid}/bindings/openai", headers=AUTH).status_code == 200
    _err(client.delete(f"/admin/v1/accounts/{aid}/bindings/openai", headers=AUTH), 404)
    assert repo.lookup_key(key["key"]).bound_providers == frozenset()


def test_credits_usage_logs_risk_events(ctx):
    client, repo, _, granted = ctx
    aid = client.post("/admin/v1/accounts", json={"name": "A", "plan": "free"}, headers=AUTH).json()["id"]
    r = client.post(f"/admin/v1/accounts/{aid}/credits", json={"amount": 12.5, "reason": "promo"}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["balance"] == 12.5 and body["balance_micro"] == 12_500_000
    assert body["ledger"]["kind"] == "grant" and body["ledger"]["reason"] == "promo"
    assert granted == [(aid, 12_500_000)]
    for bad in ({"amount": 0}, {"amount": -1}, {"amount": "lots"}, {}):
        err = _err(client.post(f"/admin/v1/accounts/{aid}/credits", json=bad, headers=AUTH), 400)
        assert err["param"] == "amount"
    _err(client.post("/admin/v1/accounts/acc_nope/credits", json={"amount": 1}, headers=AUTH), 404)

    repo.append_ledger([{"account_id": aid, "request_id": "req_1", "kind": "charge", "amount": 2_000_000}])
    usage = client.get(f"/admin/v1/accounts/{aid}/usage", headers=AUTH).json()
    assert usage["credits"]["balance"] == 10.5 and usage["credits"]["granted"] == 12.5
    assert usage["credits"]["charged"] == 2.0 and usage["credits"]["refunded"] == 0
    assert usage["quota"] == {"requests_used": 3, "requests_left": 197}
    _err(client.get("/admin/v1/accounts/acc_nope/usage", headers=AUTH), 404)

    repo.insert_logs([
        {"request_id": f"req_{i}", "account_id": aid, "key_id": "key_x", "key_prefix": "trex-abcdefg",
         "status": 200 if i % 2 else 429, "model_requested": "gpt-4o-mini", "attempts": 1,
         "created_at": f"2025-01-01T00:00:0{i}Z"}
        for i in range(6)
    ])
    logs = client.get(f"/admin/v1/accounts/{aid}/logs?limit=2", headers=AUTH).json()
    assert [r["request_id"] for r in logs["data"]] == ["req_5", "req_4"] and logs["next_before"] == "req_4"
    page = client.get(f"/admin/v1/accounts/{aid}/logs?limit=2&before=req_4", headers=AUTH).json()
    assert [r["request_id"] for r in page["data"]] == ["req_3", "req_2"]
    only429 = client.get(f"/admin/v1/accounts/{aid}/logs?status=429", headers=AUTH).json()["data"]
    assert [r["request_id"] for r in only429] == ["req_4", "req_2", "req_0"]
    _err(client.get(f"/admin/v1/accounts/{aid}/logs?limit=0", headers=AUTH), 400)
    _err(client.get("/admin/v1/accounts/acc_nope/logs", headers=AUTH), 404)

    repo.add_risk_event(aid, "spend_alert", None, {"cap": "daily", "fraction": 0.8})
    repo.add_risk_event(aid, "spend_cap_reached", None, {"cap": "daily"})
    events = client.get(f"/admin/v1/accounts/{aid}/risk-events?limit=5", headers=AUTH).json()["data"]
    assert [e["kind"] for e in events] == ["spend_cap_reached", "spend_alert"]
    audit = client.get(f"/admin/v1/audit?account_id={aid}", headers=AUTH).json()["data"]
    assert audit[0]["action"] == "credits.grant"


def test_cli_against_a_live_server(tmp_path, monkeypatch, capsys):
    """The CLI commands drive a real HTTP server (uvicorn in a thread) through urllib."""
    import json
    import threading
    import time

    import uvicorn

    from trex_serve.local import cli_admin
    from trex_serve.local.embedded import free_port

    eng = create_engine(f"sqlite:///{tmp_path / 'cli.db'}")
    migrate(eng)
    repo = Repository(eng, "cli-secret")
    repo.sync_plans(PLANS)
    app = FastAPI()

    @app.exception_handler(TrexError)
    async def _trex(request: Request, exc: TrexError) -> JSONResponse:
        return JSONResponse(exc.envelope("req_cli"), status_code=exc.status)

    app.include_router(build_admin_router(repo, TOKEN))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    monkeypatch.setenv("TREX_HTTP_PORT", str(port))
    monkeypatch.setenv("TREX_ADMIN_TOKEN", TOKEN)

    def run(*argv: str) -> tuple[int, object, str]:
        code = cli_admin.main(list(argv))
        out = capsys.readouterr()
        return code, (json.loads(out.out) if out.out.strip() else None), out.err

    try:
        code, acc, _ = run("accounts", "create", "--name", "Acme", "--plan", "free")
        assert code == 0 and acc["id"].startswith("acc_")
        aid = acc["id"]
        code, key, _ = run("keys", "create", aid, "--name", "ci", "--rpm", "5", "--models", "a,b")
        assert code == 0 and key["key"].startswith("trex-") and key["limits"] == {"rpm": 5}
        code, upd, _ = run("keys", "update", key["id"], "--state", "suspended", "--risk",
                           '{"max_output_tokens": 64}')
        assert code == 0 and upd["state"] == "suspended" and upd["risk"] == {"max_output_tokens": 64}
        code, upd, _ = run("keys", "update", key["id"], "--limits", "null")
        assert code == 0 and upd["limits"] is None
        code, upd, _ = run("accounts", "update", aid, "--subscription-state", "past_due",
                           "--log-content", "true")
        assert code == 0 and upd["subscription_state"] == "past_due" and upd["log_content"] is True
        code, bnd, _ = run("bindings", "set", aid, "openai", "--api-key", "sk-cli-0123456789abcd")
        assert code == 0 and bnd["api_key"] == "sk-…abcd"
        code, grant, _ = run("credits", "grant", aid, "3.5", "--reason", "cli")
        assert code == 0 and grant["balance"] == 3.5
        code, usage, _ = run("accounts", "usage", aid)
        assert code == 0 and usage["credits"]["balance"] == 3.5
        code, logs, _ = run("accounts", "logs", aid, "--limit", "5")
        assert code == 0 and logs["data"] == []
        code, audit, _ = run("audit", "--limit", "3")
        assert code == 0 and audit["data"][0]["action"] == "credits.grant"
        code, _, err = run("accounts", "update", aid, "--plan", "gold")
        assert code == 1 and json.loads(err)["error"]["param"] == "plan"
        code, _, err = run("accounts", "usage", aid, "--token", "wrong")
        assert code == 1 and json.loads(err)["error"]["code"] == "invalid_api_key"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    monkeypatch.setenv("TREX_HTTP_PORT", str(port))
    code, _, err = run("accounts", "list")
    assert code == 2 and "cannot reach" in err
