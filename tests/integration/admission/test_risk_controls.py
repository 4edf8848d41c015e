"""Risk controls through the real gate (CONTRACT.md section 9): spend caps exact under concurrency,
alerts once per period, the velocity guard suspending a key and an operator resuming it, audit rows
without secrets, and client addresses behind trusted proxies."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.gateway import OP, account, chat, code, new_key
from trex_serve.admission.client_ip import client_address


async def test_daily_spend_cap_is_never_overshot_under_concurrency(gw):
    acc = await account(gw, credits=50)
    # Each big-model request reserves ~(prompt + 64 output tokens) at premium prices; the cap admits a few.
    key = await new_key(gw, acc, risk={"daily_spend_cap": 0.005, "alert_at": 0.5})
    results = await asyncio.gather(*[chat(gw, key["key"], model="big-model", max_tokens=64) for _ in range(25)])
    ok = [r for r in results if r.status_code == 200]
    capped = [r for r in results if r.status_code == 402]
    assert ok and capped and len(ok) + len(capped) == 25
    assert all(code(r) == "spend_limit_exceeded" and int(r.headers["retry-after"]) >= 1 for r in capped)
    await gw.runtime.ledger.flush_once()
    charged = gw.runtime.repo.ledger_totals(acc["id"])["charged"]
    expected = sum(r.json()["usage"]["prompt_tokens"] * 5 + r.json()["usage"]["completion_tokens"] * 15 for r in ok)
    assert charged == expected <= 5000
    spent = await gw.runtime.counters.spent("key", key["id"])
    assert spent["day"] == charged
    await gw.runtime.risk_events.flush_once()
    kinds = [e["kind"] for e in gw.runtime.repo.list_risk_events(acc["id"], 100)]
    assert kinds.count("spend_alert") == 1 and "spend_cap_reached" in kinds


async def test_account_cap_applies_to_all_its_keys(gw):
    acc = await account(gw, credits=50, risk={"monthly_spend_cap": 0.0001})
    key = await new_key(gw, acc)
    r = await chat(gw, key["key"], model="big-model", max_tokens=64)
    assert (r.status_code, code(r)) == (402, "spend_limit_exceeded")
    assert (await chat(gw, key["key"])).status_code == 200  # quota-billed traffic is not a spend


async def test_velocity_guard_suspends_the_key_and_an_operator_resumes_it(gw):
    acc = await account(gw, credits=50)
    key = await new_key(gw, acc, risk={"velocity": {"window_s": 60, "max_credits": 0.0002}})
    statuses = []
    for _ in range(6):
        r = await chat(gw, key["key"], model="big-model", max_tokens=16)
        statuses.append(r.status_code if r.status_code == 200 else code(r))
        if r.status_code != 200:
            break
    assert statuses[-1] == "api_key_suspended" and 200 in statuses
    events = gw.runtime.repo.list_risk_events(acc["id"], 10)
    assert any(e["kind"] == "auto_suspended" and e["key_id"] == key["id"] for e in events)
    assert (await gw.patch(f"/admin/v1/keys/{key['id']}", json={"state": "active", "risk": None},
                           headers=OP)).status_code == 200
    assert (await chat(gw, key["key"], model="big-model", max_tokens=16)).status_code == 200


async def test_audit_trail_records_changes_without_secrets(gw):
    acc = await account(gw)
    key = await new_key(gw, acc)
    await gw.put(f"/admin/v1/accounts/{acc['id']}/bindings/byok", json={"api_key": "sk-very-secret-9876"}, headers=OP)
    await gw.patch(f"/admin/v1/keys/{key['id']}", json={"risk": {"allowed_ips": ["10.0.0.0/8"]}}, headers=OP)
    await gw.post(f"/admin/v1/accounts/{acc['id']}/credits", json={"amount": 3, "reason": "t"}, headers=OP)
    audit = (await gw.get("/admin/v1/audit?limit=50", headers=OP)).json()["data"]
    mine = [a for a in audit if a["account_id"] == acc["id"]]
    actions = {a["action"] for a in mine}
    assert {"account.create", "key.create", "key.update"} <= actions
    assert any("binding" in a for a in actions) and any("credit" in a for a in actions)
    text = str(mine)
    assert "sk-very-secret-9876" not in text and key["key"] not in text


@pytest.mark.parametrize("peer,xff,trusted,expected", [
    ("198.51.100.7", None, (), "198.51.100.7"),
    ("198.51.100.7", "1.2.3.4", (), "198.51.100.7"),                      # no trusted proxy: header ignored
    ("198.51.100.7", "1.2.3.4", ("10.0.0.0/8",), "198.51.100.7"),         # untrusted peer: header ignored
    ("10.0.0.5", "203.0.113.9", ("10.0.0.0/8",), "203.0.113.9"),
    ("10.0.0.5", "6.6.6.6, 203.0.113.9, 10.0.0.4", ("10.0.0.0/8",), "203.0.113.9"),  # spoofed entry left of the client
    ("10.0.0.5", "garbage, 10.0.0.4", ("10.0.0.0/8",), "10.0.0.5"),
    ("::1", "2001:db8::7", ("::1/128",), "2001:db8::7"),
])
def test_client_address_reads_forwarded_for_only_past_trusted_proxies(peer, xff, trusted, expected):
    assert client_address(peer, xff, trusted) == expected
