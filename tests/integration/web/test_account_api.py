"""The account API (/v1/dashboard) and the dashboard page, through the whole gateway in process:
SQL store (SQLite and PostgreSQL), real Redis counters, the relay hop and mock upstream processes.
An owner manages their own keys and bindings, reads their own usage, logs, risk events, audit trail
and traffic, and never anything of another account."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

OP = {"Authorization": "Bearer op"}
D = "/v1/dashboard"


def owner(acc):
    return {"Authorization": f"Bearer {acc['owner_token']}"}


async def account(gw, name="t", credits=None):
    r = await gw.post("/admin/v1/accounts", json={"name": name, "plan": "free"}, headers=OP)
    assert r.status_code == 201, r.text
    acc = r.json()
    if credits:
        await gw.post(f"/admin/v1/accounts/{acc['id']}/credits", json={"amount": credits, "reason": "t"}, headers=OP)
    return acc


async def chat(gw, key, model="gpt-4o-mini"):
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
    return await gw.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


def code(r):
    return r.json()["error"]["code"]


async def test_owner_creates_a_key_shown_once_and_revokes_it(gw):
    acc = await account(gw)
    r = await gw.post(f"{D}/keys", json={"name": "prod"}, headers=owner(acc))
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["key"].startswith(created["prefix"]) and created["account_id"] == acc["id"]

    listed = (await gw.get(f"{D}/keys", headers=owner(acc))).json()["data"]
    assert [k["id"] for k in listed] == [created["id"]]
    assert created["key"] not in (await gw.get(f"{D}/keys", headers=owner(acc))).text

    assert (await chat(gw, created["key"])).status_code == 200
    r = await gw.patch(f"{D}/keys/{created['id']}", json={"state": "inactive"}, headers=owner(acc))
    assert r.status_code == 200 and r.json()["state"] == "inactive"
    assert code(await chat(gw, created["key"])) == "api_key_inactive"
    r = await gw.patch(f"{D}/keys/{created['id']}", json={"state": "active"}, headers=owner(acc))
    assert r.json()["state"] == "active" and (await chat(gw, created["key"])).status_code == 200

    r = await gw.delete(f"{D}/keys/{created['id']}", headers=owner(acc))
    assert r.status_code == 200 and r.json()["state"] == "revoked"
    r = await chat(gw, created["key"])
    assert r.status_code == 401 and code(r) == "api_key_revoked"
    r = await gw.patch(f"{D}/keys/{created['id']}", json={"state": "active"}, headers=owner(acc))
    assert r.status_code == 409

    audit = (await gw.get(f"{D}/audit", headers=owner(acc))).json()["data"]
    mine = [(a["actor"], a["action"]) for a in audit if a["target_id"] == created["id"]]
    assert ("owner", "key.create") in mine and ("owner", "key.update") in mine
    assert created["key"] not in (await gw.get(f"{D}/audit", headers=owner(acc))).text


async def test_owner_may_not_lift_a_suspension_or_set_other_states(gw):
    acc = await account(gw)
    key = (await gw.post(f"{D}/keys", json={}, headers=owner(acc))).json()
    await gw.patch(f"/admin/v1/keys/{key['id']}", json={"state": "suspended"}, headers=OP)
    r = await gw.patch(f"{D}/keys/{key['id']}", json={"state": "active"}, headers=owner(acc))
    assert r.status_code == 409 and code(r) == "conflict"
    r = await gw.patch(f"{D}/keys/{key['id']}", json={"state": "suspended"}, headers=owner(acc))
    assert r.status_code == 400
    r = await gw.post(f"{D}/keys", json={"billing_policy": "downgrade", "account_id": "x"}, headers=owner(acc))
    assert r.status_code == 400


async def test_owner_binds_a_provider_and_sees_it_masked(gw):
    acc = await account(gw)
    secret = "sk-owner-secret-0123456789"
    r = await gw.put(f"{D}/bindings/byok", json={"api_key": secret}, headers=owner(acc))
    assert r.status_code == 200, r.text
    assert r.json()["provider"] == "byok" and secret not in r.text
    listed = await gw.get(f"{D}/bindings", headers=owner(acc))
    assert [b["provider"] for b in listed.json()["data"]] == ["byok"] and secret not in listed.text
    audit = await gw.get(f"{D}/audit", headers=owner(acc))
    assert secret not in audit.text
    assert ("owner", "binding.put") in [(a["actor"], a["action"]) for a in audit.json()["data"]]

    r = await gw.put(f"{D}/bindings/nowhere", json={"api_key": secret}, headers=owner(acc))
    assert r.status_code == 400 and r.json()["error"]["param"] == "provider"
    r = await gw.delete(f"{D}/bindings/byok", headers=owner(acc))
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert (await gw.get(f"{D}/bindings", headers=owner(acc))).json()["data"] == []
    assert (await gw.delete(f"{D}/bindings/byok", headers=owner(acc))).status_code == 404


async def test_owner_sees_plan_subscription_usage_and_credits(gw):
    acc = await account(gw, credits=5)
    view = (await gw.get(f"{D}/account", headers=owner(acc))).json()
    assert view["viewer"] == "owner" and view["account"]["id"] == acc["id"]
    assert view["plan"]["name"] == acc["plan"] and view["subscription"]["state"] == "active"
    assert "alpha" in view["providers"]

    key = (await gw.post(f"{D}/keys", json={}, headers=owner(acc))).json()
    assert (await chat(gw, key["key"])).status_code == 200
    usage = (await gw.get(f"{D}/usage", headers=owner(acc))).json()
    assert usage["quota"]["requests_used"] == 1
    assert usage["quota"]["requests_left"] == usage["quota"]["requests_limit"] - 1
    assert usage["quota"]["resets_in_s"] > 0
    assert usage["credits"]["granted"] == 5 and usage["credits"]["balance_micro"] == 5_000_000


async def test_request_id_appears_in_its_own_account_logs_only(gw):
    a, b = await account(gw, "a"), await account(gw, "b")
    key_a = (await gw.post(f"{D}/keys", json={}, headers=owner(a))).json()
    key_b = (await gw.post(f"{D}/keys", json={}, headers=owner(b))).json()
    r = await chat(gw, key_a["key"])
    assert r.status_code == 200
    rid = r.headers["X-Trex-Request-Id"]
    await gw.runtime.logs.flush_once()

    logs_a = (await gw.get(f"{D}/logs", headers=owner(a))).json()["data"]
    assert [row["request_id"] for row in logs_a] == [rid] and logs_a[0]["key_id"] == key_a["id"]
    filtered = (await gw.get(f"{D}/logs", params={"key_id": key_a["id"], "status": "ok",
                                                  "model": "gpt-4o-mini"}, headers=owner(a))).json()
    assert [row["request_id"] for row in filtered["data"]] == [rid]
    assert (await gw.get(f"{D}/logs", params={"status": "error"}, headers=owner(a))).json()["data"] == []

    logs_b = await gw.get(f"{D}/logs", headers=owner(b))
    assert logs_b.json()["data"] == [] and rid not in logs_b.text
    r = await gw.get(f"{D}/logs", params={"before": rid}, headers=owner(b))
    assert r.status_code == 400 and rid not in str(r.json().get("data", ""))
    r = await gw.get(f"{D}/logs", params={"key_id": key_a["id"]}, headers=owner(b))
    assert r.json()["data"] == []

    traffic_a = (await gw.get(f"{D}/traffic", headers=owner(a))).json()
    assert traffic_a["totals"]["requests"] == 1 and len(traffic_a["buckets"]) == 60
    assert traffic_a["buckets"][-1]["requests"] == 1 and traffic_a["buckets"][-1]["p50_ms"] is not None
    assert (await gw.get(f"{D}/traffic", headers=owner(b))).json()["totals"]["requests"] == 0
    assert key_b["id"] not in (await gw.get(f"{D}/logs", headers=owner(a))).text


async def test_traffic_counts_errors_fallbacks_and_latency_per_minute(gw):
    acc, other = await account(gw, "a"), await account(gw, "b")
    now = datetime.now(UTC)
    rows = [
        {"request_id": f"r{i}", "account_id": acc["id"], "created_at": now, "status": status,
         "attempts": attempts, "latency_ms": latency}
        for i, (status, attempts, latency) in enumerate(
            [(200, 1, 10.0), (200, 2, 20.0), (502, 2, 30.0), (429, 1, 40.0)])
    ]
    rows.append({"request_id": "old", "account_id": acc["id"], "created_at": now - timedelta(minutes=5),
                 "status": 200, "attempts": 1, "latency_ms": 5.0})
    rows.append({"request_id": "stale", "account_id": acc["id"], "created_at": now - timedelta(hours=3),
                 "status": 200, "attempts": 1, "latency_ms": 5.0})
    rows.append({"request_id": "theirs", "account_id": other["id"], "created_at": now, "status": 500,
                 "attempts": 3, "latency_ms": 99.0})
    gw.runtime.repo.insert_logs(rows)

    t = (await gw.get(f"{D}/traffic", params={"minutes": 10}, headers=owner(acc))).json()
    assert len(t["buckets"]) == 10
    assert t["totals"] == {"requests": 5, "errors": 2, "fallbacks": 2}
    last = t["buckets"][-1]
    assert (last["requests"], last["errors"], last["fallbacks"]) == (4, 2, 2)
    assert (last["p50_ms"], last["p95_ms"]) == (20.0, 40.0)
    assert t["buckets"][-6]["requests"] == 1 and t["buckets"][0]["p50_ms"] is None
    r = await gw.get(f"{D}/traffic", params={"minutes": 0}, headers=owner(acc))
    assert r.status_code == 400


async def test_no_endpoint_gives_one_account_anything_of_another(gw):
    a, b = await account(gw, "a", credits=3), await account(gw, "b")
    key_a = (await gw.post(f"{D}/keys", json={"name": "a-key"}, headers=owner(a))).json()
    await gw.put(f"{D}/bindings/byok", json={"api_key": "sk-a-secret-999999"}, headers=owner(a))
    rid = (await chat(gw, key_a["key"])).headers["X-Trex-Request-Id"]
    await gw.runtime.logs.flush_once()

    # B's token against A's ids: 404, and A's key is untouched.
    for method, path, body in [("PATCH", f"/keys/{key_a['id']}", {"state": "inactive"}),
                               ("DELETE", f"/keys/{key_a['id']}", None),
                               ("DELETE", "/bindings/byok", None)]:
        r = await gw.request(method, D + path, json=body, headers=owner(b))
        assert r.status_code == 404, (method, path, r.text)
        assert key_a["id"] not in r.text or r.json()["error"]["code"] == "not_found"
    assert (await gw.get(f"/admin/v1/keys/{key_a['id']}", headers=OP)).json()["state"] == "active"
    assert len((await gw.get(f"{D}/bindings", headers=owner(a))).json()["data"]) == 1

    # B's reads hold nothing of A, even when B names A's account.
    for path in ["/account", "/keys", "/bindings", "/usage", "/logs", "/risk-events", "/audit", "/traffic"]:
        for params in ({}, {"account_id": a["id"]}):
            r = await gw.get(D + path, params=params, headers=owner(b))
            assert r.status_code == 200, (path, r.text)
            for secret in (a["id"], key_a["id"], rid, "a-key"):
                assert secret not in r.text, (path, params, secret)

    # Missing, malformed or unknown tokens: 401 envelope on every endpoint.
    endpoints = [("GET", p) for p in ["/account", "/keys", "/bindings", "/usage", "/logs", "/risk-events",
                                      "/audit", "/traffic"]]
    endpoints += [("POST", "/keys"), ("PATCH", f"/keys/{key_a['id']}"), ("DELETE", f"/keys/{key_a['id']}"),
                  ("PUT", "/bindings/byok"), ("DELETE", "/bindings/byok")]
    for headers in ({}, {"Authorization": "Basic op"}, {"Authorization": "Bearer trexo-nope"},
                    {"Authorization": f"Bearer {key_a['key']}"}):
        for method, path in endpoints:
            r = await gw.request(method, D + path, json={"api_key": "x", "state": "inactive"}, headers=headers)
            assert r.status_code == 401, (headers, method, path, r.text)
            assert r.json()["error"]["type"] == "authentication_error"
    assert (await gw.get(f"/admin/v1/keys/{key_a['id']}", headers=OP)).json()["state"] == "active"

    # Owner tokens are no operator tokens.
    for path in ["/admin/v1/accounts", f"/admin/v1/accounts/{a['id']}", f"/admin/v1/accounts/{a['id']}/keys",
                 "/admin/v1/audit", f"/admin/v1/accounts/{a['id']}/logs"]:
        assert (await gw.get(path, headers=owner(a))).status_code == 401, path

    # The operator views any account by id, and only that account.
    r = await gw.get(f"{D}/logs", params={"account_id": a["id"]}, headers=OP)
    assert [row["request_id"] for row in r.json()["data"]] == [rid]
    view = (await gw.get(f"{D}/account", params={"account_id": b["id"]}, headers=OP)).json()
    assert view["viewer"] == "operator" and view["account"]["id"] == b["id"]
    assert (await gw.get(f"{D}/keys", headers=OP)).status_code == 400
    assert (await gw.get(f"{D}/keys", params={"account_id": "acc_nope"}, headers=OP)).status_code == 404
    r = await gw.post(f"{D}/keys", params={"account_id": b["id"]}, json={"name": "by-op"}, headers=OP)
    assert r.status_code == 201
    audit = (await gw.get(f"{D}/audit", headers=owner(b))).json()["data"]
    assert ("operator", "key.create") in [(x["actor"], x["action"]) for x in audit]


async def test_dashboard_page_and_assets_are_served(gw):
    await account(gw)
    r = await gw.get("/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert '<form id="signin-form"' in r.text
    for name, kind in [("app.js", "text/javascript"), ("app.css", "text/css")]:
        asset = await gw.get(f"/dashboard/static/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
    missing = await gw.get("/dashboard/static/nope.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert (await gw.get("/dashboard/static/..%2F..%2Fruntime.py")).status_code == 404
