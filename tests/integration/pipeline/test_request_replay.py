"""A request the front proxy sends again (its first ingress replica died before a byte of the answer
left) carries the same front-assigned id: it is answered, and billed once."""

from __future__ import annotations

import uuid

from tests.integration.gateway import OP, account, chat, new_key
from trex_serve.billing import pricing as billing
from trex_serve.web.front_id import AUTH_HEADER, ID_HEADER, front_secret


def front_headers(rid: str, secret: str | None = None) -> dict[str, str]:
    return {ID_HEADER: rid, AUTH_HEADER: secret if secret is not None else front_secret("test-secret")}


async def test_replay_of_an_answered_request_is_answered_again_and_charged_once(gw):
    acc = await account(gw, credits=5)
    made = await new_key(gw, acc)
    key = made["key"]
    counters = gw.runtime.counters
    before = billing.micro_from_credits(5)
    rid = "req_" + uuid.uuid4().hex
    first = await chat(gw, key, model="big-model", headers=front_headers(rid))
    assert first.status_code == 200 and first.headers["x-trex-request-id"] == rid
    after_first = await counters.get_balance(acc["id"])
    assert after_first < before
    replay = await chat(gw, key, model="big-model", headers=front_headers(rid))
    assert replay.status_code == 200 and replay.headers["x-trex-request-id"] == rid
    assert replay.json()["choices"][0]["message"]["content"]
    assert await counters.get_balance(acc["id"]) == after_first
    assert await counters.inflight(made["id"]) == 0


async def test_a_request_id_without_the_front_secret_is_ignored(gw):
    acc = await account(gw, credits=5)
    key = (await new_key(gw, acc))["key"]
    rid = "req_" + uuid.uuid4().hex
    forged = await chat(gw, key, model="big-model", headers=front_headers(rid, "forged"))
    assert forged.status_code == 200 and forged.headers["x-trex-request-id"] != rid
    # A client cannot buy a free replay by reusing an id: each of its requests is charged.
    counters = gw.runtime.counters
    before = await counters.get_balance(acc["id"])
    assert before is not None and before < billing.micro_from_credits(5)
    again = await chat(gw, key, model="big-model", headers=front_headers(rid, "forged"))
    assert again.status_code == 200 and await counters.get_balance(acc["id"]) < before



async def test_an_operator_change_replayed_under_the_same_id_is_refused_not_applied_twice(gw):
    acc = await account(gw)
    rid = "req_" + uuid.uuid4().hex
    grant = {"amount": 7, "reason": "replay"}
    url = f"/admin/v1/accounts/{acc['id']}/credits"
    first = await gw.post(url, json=grant, headers={**OP, **front_headers(rid)})
    assert first.status_code in (200, 201), first.text
    again = await gw.post(url, json=grant, headers={**OP, **front_headers(rid)})
    assert again.status_code == 409 and again.json()["error"]["code"] == "request_replayed"
    assert again.headers["x-trex-request-id"] == rid
    usage = (await gw.get(f"/admin/v1/accounts/{acc['id']}/usage", headers=OP)).json()
    assert usage["credits"]["balance"] == 7
    # Without the front's id (or with a forged secret), every request is its own.
    for _ in range(2):
        r = await gw.post(url, json=grant, headers={**OP, **front_headers(rid, "forged")})
        assert r.status_code in (200, 201)
