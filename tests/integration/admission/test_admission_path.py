"""Admission through the real gate, in process: SQL store (SQLite and PostgreSQL), real Redis
counters, the relay hop and mock upstream processes. Each error code of CONTRACT.md section 2 that
admission owns, and that nothing is charged for a refused request."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from tests.integration.gateway import OP, account, chat, code, new_key
from trex_serve.admission.counters import AdmitRequest, SettleRequest


async def test_key_states_map_to_their_codes(gw):
    acc = await account(gw)
    for state, expected in [("revoked", "api_key_revoked"), ("inactive", "api_key_inactive"),
                            ("suspended", "api_key_suspended")]:
        key = await new_key(gw, acc)
        assert (await chat(gw, key["key"])).status_code == 200
        await gw.patch(f"/admin/v1/keys/{key['id']}", json={"state": state}, headers=OP)
        r = await chat(gw, key["key"])
        assert (r.status_code, code(r)) == (401, expected)
    expired = await new_key(gw, acc, expires_at=(datetime.now(UTC) - timedelta(minutes=1)).isoformat())
    r = await chat(gw, expired["key"])
    assert (r.status_code, code(r)) == (401, "api_key_inactive")


async def test_account_and_subscription_states(gw):
    acc = await account(gw)
    key = await new_key(gw, acc)
    await gw.patch(f"/admin/v1/accounts/{acc['id']}", json={"state": "suspended"}, headers=OP)
    r = await chat(gw, key["key"])
    assert (r.status_code, code(r)) == (401, "account_suspended")
    await gw.patch(f"/admin/v1/accounts/{acc['id']}", json={"state": "active", "subscription_state": "canceled"},
                   headers=OP)
    r = await chat(gw, key["key"])
    assert (r.status_code, code(r)) == (402, "subscription_inactive")
    grace = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    await gw.patch(f"/admin/v1/accounts/{acc['id']}", json={"subscription_state": "past_due", "grace_until": grace},
                   headers=OP)
    assert (await chat(gw, key["key"])).status_code == 200


async def test_rate_limit_then_quota_with_retry_after_and_headers(gw):
    acc = await account(gw, plan="tight")
    key = await new_key(gw, acc)
    first = await chat(gw, key["key"])
    assert first.headers["x-ratelimit-limit-requests"] == "3"
    assert first.headers["x-ratelimit-remaining-requests"] == "2"
    assert (await chat(gw, key["key"])).status_code == 200
    r = await chat(gw, key["key"])
    assert (r.status_code, code(r)) == (429, "insufficient_quota")
    assert int(r.headers["retry-after"]) >= 1
    # A refused request changes nothing: it did not count against the minute's requests either.
    limited = await new_key(gw, await account(gw), limits={"rpm": 1})
    assert (await chat(gw, limited["key"])).status_code == 200
    r = await chat(gw, limited["key"])
    assert (r.status_code, code(r)) == (429, "rate_limit_exceeded")
    assert 1 <= int(r.headers["retry-after"]) <= 60


async def test_failed_request_costs_no_quota(gw):
    acc = await account(gw, plan="tight")
    key = await new_key(gw, acc)
    for m in gw.mocks.values():
        m.control(error_rate=1.0, error_status=503)
    assert (await chat(gw, key["key"])).status_code == 502
    usage = (await gw.get(f"/admin/v1/accounts/{acc['id']}/usage", headers=OP)).json()
    assert usage["quota"]["requests_used"] == 0


async def test_insufficient_credits_then_grant_then_exact_charge(gw):
    acc = await account(gw)
    key = await new_key(gw, acc)
    r = await chat(gw, key["key"], model="big-model")
    assert (r.status_code, code(r)) == (402, "insufficient_credits")
    await gw.post(f"/admin/v1/accounts/{acc['id']}/credits", json={"amount": 1, "reason": "t"}, headers=OP)
    r = await chat(gw, key["key"], model="big-model")
    assert r.status_code == 200 and r.headers["x-trex-billing"] == "credits"
    usage = r.json()["usage"]
    await gw.runtime.ledger.flush_once()
    totals = gw.runtime.repo.ledger_totals(acc["id"])
    assert totals["charged"] == usage["prompt_tokens"] * 5 + usage["completion_tokens"] * 15
    assert await gw.runtime.counters.get_balance(acc["id"]) == totals["balance"]


async def test_downgrade_policy_serves_smart_auto(gw):
    acc = await account(gw)
    key = await new_key(gw, acc, billing_policy="downgrade")
    r = await chat(gw, key["key"], model="big-model")
    assert r.status_code == 200
    assert r.headers["x-trex-downgraded"] == "1" and r.headers["x-trex-billing"] == "quota"


async def test_binding_missing_then_override_then_bound_key(gw):
    acc = await account(gw)
    key = await new_key(gw, acc)
    r = await chat(gw, key["key"], model="byok-model")
    assert (r.status_code, code(r)) == (424, "provider_binding_missing")
    assert "byok" in r.json()["error"]["message"]
    r = await chat(gw, key["key"], model="byok-model", headers={"X-Upstream-Api-Key": "sk-override-1234"})
    assert r.status_code == 200
    assert gw.mocks["alpha"].stats()["last_auth"] == "Bearer sk-override-1234"
    await gw.put(f"/admin/v1/accounts/{acc['id']}/bindings/byok", json={"api_key": "sk-bound-5678"}, headers=OP)
    r = await chat(gw, key["key"], model="byok-model")
    assert r.status_code == 200 and gw.mocks["alpha"].stats()["last_auth"] == "Bearer sk-bound-5678"
    logs = (await gw.get(f"/admin/v1/accounts/{acc['id']}/logs", headers=OP)).text
    await gw.runtime.logs.flush_once()
    assert "sk-override" not in logs and "sk-bound" not in logs


async def test_provider_without_a_key_needs_a_binding_and_a_refusal_changes_nothing(gw):
    from tests.integration.test_hardening_input import State, assert_unchanged

    acc = await account(gw, credits=5)
    key = await new_key(gw, acc)
    state = State(gw, acc, key)
    assert (await chat(gw, key["key"])).status_code == 200  # warm the key cache and the balance
    auth = {"Authorization": f"Bearer {key['key']}"}
    ids = [m["id"] for m in (await gw.get("/v1/models", headers=auth)).json()["data"]]
    assert "gpt-4o-mini" in ids and "keyless-model" not in ids and "byok-model" not in ids
    assert (await gw.get("/v1/models/keyless-model", headers=auth)).status_code == 404
    before = await state.snap()
    for stream in (False, True):
        r = await chat(gw, key["key"], model="keyless-model", stream=stream)
        assert (r.status_code, code(r)) == (424, "provider_binding_missing")
        err = r.json()["error"]
        assert "keyless" in err["message"] and err["trex"]["providers"] == ["keyless"]
        assert r.headers["x-trex-attempts"] == "0"
    r = await gw.post("/v1/responses", json={"model": "keyless-model", "input": "hi"}, headers=auth)
    assert (r.status_code, code(r)) == (424, "provider_binding_missing")
    # Not admitted (RPM, quota, leases untouched), not charged, nothing sent upstream.
    assert_unchanged(before, await state.snap())
    await gw.put(f"/admin/v1/accounts/{acc['id']}/bindings/keyless", json={"api_key": "sk-own-4321"}, headers=OP)
    ids = [m["id"] for m in (await gw.get("/v1/models", headers=auth)).json()["data"]]
    assert "keyless-model" in ids
    r = await chat(gw, key["key"], model="keyless-model")
    assert r.status_code == 200 and gw.mocks["alpha"].stats()["last_auth"] == "Bearer sk-own-4321"


async def test_auth_none_provider_is_called_without_any_authorization(gw):
    acc = await account(gw)
    key = await new_key(gw, acc)
    r = await chat(gw, key["key"])
    assert r.status_code == 200 and r.headers["x-trex-upstream-provider"] == "alpha"
    stats = gw.mocks["alpha"].stats()
    assert stats["last_model"] == "alpha-mini" and stats["last_auth"] is None


async def test_fallback_outside_the_catalog_is_400_naming_the_allowed_pairs(gw):
    acc = await account(gw)
    key = await new_key(gw, acc)
    before = gw.mocks["alpha"].stats()["requests"]
    r = await chat(gw, key["key"], trex={"routing": {"fallbacks": [{"provider": "beta", "model": "gpt-9"}]}})
    assert (r.status_code, code(r)) == (400, "invalid_request_error")
    err = r.json()["error"]
    assert err["param"] == "trex.routing.fallbacks[0]"
    assert "beta/beta-mini" in err["message"] and "beta/beta-big" in err["message"]
    assert gw.mocks["alpha"].stats()["requests"] == before
    r = await chat(gw, key["key"], trex={"routing": {"fallbacks": [{"provider": "beta", "model": "beta-mini"}]}})
    assert r.status_code == 200


async def test_model_allow_list_and_plan_premium(gw):
    acc = await account(gw, plan="tight")
    key = await new_key(gw, acc, models=["gpt-4o-mini"])
    r = await gw.get("/v1/models", headers={"Authorization": f"Bearer {key['key']}"})
    assert [m["id"] for m in r.json()["data"]] == ["gpt-4o-mini"]
    r = await chat(gw, key["key"], model="smart-auto")
    assert (r.status_code, code(r)) == (404, "model_not_found")
    other = await new_key(gw, acc)
    r = await chat(gw, other["key"], model="big-model")  # the tight plan has no premium models
    assert (r.status_code, code(r)) == (404, "model_not_found")


async def test_failed_auth_throttle_spares_valid_keys(gw):
    acc = await account(gw)
    key = await new_key(gw, acc)
    codes = [code(await chat(gw, f"trex-wrong-{i}")) for i in range(7)]
    assert codes[:5] == ["invalid_api_key"] * 5 and codes[-1] == "too_many_auth_failures"
    assert (await chat(gw, key["key"])).status_code == 200


async def test_risk_ip_allow_list_and_ceilings(gw):
    acc = await account(gw)
    key = await new_key(gw, acc, risk={"allowed_ips": ["203.0.113.0/24"], "max_output_tokens": 100})
    r = await chat(gw, key["key"])
    assert (r.status_code, code(r)) == (403, "ip_not_allowed")
    await gw.patch(f"/admin/v1/keys/{key['id']}", json={"risk": {"allowed_ips": ["127.0.0.0/8", "::1/128"],
                                                                  "max_output_tokens": 100}}, headers=OP)
    r = await chat(gw, key["key"], max_tokens=500)
    assert (r.status_code, code(r)) == (400, "request_limit_exceeded")
    assert r.json()["error"]["param"] == "max_tokens"
    assert (await chat(gw, key["key"], max_tokens=50)).status_code == 200


async def test_concurrency_slot_is_released_after_each_request(gw):
    acc = await account(gw, plan="tight")
    key = await new_key(gw, acc)
    gw.mocks["alpha"].control(fail_next=1, error_status=400)
    assert (await chat(gw, key["key"])).status_code == 400
    assert (await chat(gw, key["key"])).status_code == 200
    assert await gw.runtime.counters.inflight(key["id"]) == 0


async def test_a_slot_freed_a_moment_after_the_refusal_is_taken(gw):
    """Another replica's settlement, written before its answer left but read by Redis after this
    admission (another connection), frees the slot within the grace: the request is served."""
    acc = await account(gw)
    key = await new_key(gw, acc, limits={"concurrency": 1})
    counters = gw.runtime.counters
    held = AdmitRequest("req_other_replica", key["id"], acc["id"], concurrency=1)
    assert (await counters.admit(held)).ok
    r = await chat(gw, key["key"])  # nothing frees the slot: refused as before
    assert (r.status_code, code(r)) == (429, "concurrency_limit_exceeded")

    async def settle_soon() -> None:
        await asyncio.sleep(0.005)
        await counters.settle(SettleRequest("req_other_replica", success=False))
    settling = asyncio.create_task(settle_soon())
    assert (await chat(gw, key["key"])).status_code == 200
    await settling
    assert await counters.inflight(key["id"]) == 0


async def test_metrics_count_requests_and_rejections(gw):
    acc = await account(gw)
    key = await new_key(gw, acc)
    assert (await chat(gw, key["key"])).status_code == 200
    assert (await chat(gw, "trex-unknown")).status_code == 401
    text = (await gw.get("/metrics")).text
    assert 'trex_requests_total{api="chat",model="gpt-4o-mini",provider="alpha",status="200"} 1.0' in text
    assert 'trex_rejections_total{reason="invalid_api_key"} 1.0' in text
    assert "trex_request_latency_seconds_bucket" in text


async def test_ledger_reconciles_and_redis_loss_rebuilds_balances(gw, database_url, redis_url):
    from trex_serve.local.billing_reconcile import reconcile

    acc = await account(gw, credits=2)
    key = await new_key(gw, acc)
    for _ in range(3):
        assert (await chat(gw, key["key"], model="big-model")).status_code == 200
    gw.mocks["alpha"].control(fail_next=1, error_status=503)  # a fallback: billed once, for beta's answer
    assert (await chat(gw, key["key"], model="big-model")).headers["x-trex-attempts"] == "2"
    await gw.runtime.ledger.flush_once()
    totals = gw.runtime.repo.ledger_totals(acc["id"])
    assert len([r for r in gw.runtime.repo.list_ledger(acc["id"]) if r["kind"] == "charge"]) == 4
    counters = gw.runtime.counters
    report = await reconcile(database_url, redis_url, "x", prefix=counters.prefix)
    assert report["mismatched"] == 0 and report["accounts"] >= 1
    live = await counters.get_balance(acc["id"])
    assert live == totals["balance"]
    # Redis loses the balance (restart without persistence): rebuilt from the ledger on next use.
    await counters.drop_balance(acc["id"])
    assert (await chat(gw, key["key"], model="big-model")).status_code == 200
    await gw.runtime.ledger.flush_once()
    assert await counters.get_balance(acc["id"]) == gw.runtime.repo.ledger_totals(acc["id"])["balance"]
    # A drifted copy is reported, and --fix puts the ledger's figure back.
    await counters.grant(acc["id"], 123)
    drifted = await reconcile(database_url, redis_url, "x", prefix=counters.prefix)
    assert drifted["mismatched"] == 1 and drifted["rows"][0]["difference_micro"] == 123
    await reconcile(database_url, redis_url, "x", fix=True, prefix=counters.prefix)
    assert (await reconcile(database_url, redis_url, "x", prefix=counters.prefix))["mismatched"] == 0


async def test_log_retention_removes_only_old_rows(gw):
    import time as _time

    acc = await account(gw)
    key = await new_key(gw, acc)
    fresh = (await chat(gw, key["key"])).headers["x-trex-request-id"]
    await gw.runtime.logs.flush_once()
    gw.runtime.repo.insert_logs([{"request_id": "req_old", "account_id": acc["id"], "api": "chat",
                                  "created_at": _time.time() - 40 * 86400, "status": 200}])
    assert await gw.runtime.purge_old_logs() == 1
    ids = [r["request_id"] for r in gw.runtime.repo.query_logs(acc["id"], limit=10)]
    assert ids == [fresh]
