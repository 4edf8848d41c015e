"""Token classes end to end in process: the provider's usage (replayed by the mock upstream over real
HTTP, in its own wire shape) billed class by class, and the classes on the ledger row, the request
log, the usage API and the metrics; the quota counting rule."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.gateway import OP, account, chat, new_key

WIRE = Path(__file__).parents[2] / "fixtures" / "wire"


def usage_of(name: str) -> dict:
    return json.loads((WIRE / name).read_text())["usage"]


async def _settled(gw, acc_id: str) -> tuple[list[dict], list[dict]]:
    await gw.runtime.ledger.flush_once()
    await gw.runtime.logs.flush_once()
    ledger = (await gw.get(f"/admin/v1/accounts/{acc_id}/ledger", headers=OP)).json()["data"]
    logs = (await gw.get(f"/admin/v1/accounts/{acc_id}/logs", headers=OP)).json()["data"]
    return [e for e in ledger if e["kind"] == "charge"], logs


async def test_cached_openai_answer_is_billed_per_class_and_recorded(gw):
    gw.mocks["alpha"].control(usage=usage_of("openai_chat_cached.json"))
    acc = await account(gw, credits=5)
    key = await new_key(gw, acc)
    r = await chat(gw, key["key"], model="cached-model")
    assert r.status_code == 200 and r.headers["x-trex-billing"] == "credits"
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 1920
    charges, logs = await _settled(gw, acc["id"])
    # cached-model's catalog prices: input 2, cache read 0.5, output 8 credits per 1M tokens
    expected = 86 * 2 + 1920 // 2 + 300 * 8
    assert [c["amount_micro"] for c in charges] == [-expected]
    assert charges[0]["tokens"] == {"input": 86, "cache_read": 1920, "cache_write": 0, "cache_write_1h": 0,
                                    "output": 300, "reasoning": 0}
    assert "1920 cache read" in charges[0]["reason"]
    row = logs[0]
    assert (row["tokens_in"], row["tokens_out"], row["credits_charged_micro"]) == (2006, 300, expected)
    assert row["tokens"]["cache_read"] == 1920 and row["tokens"]["input"] == 86
    usage = (await gw.get(f"/admin/v1/accounts/{acc['id']}/usage", headers=OP)).json()
    assert usage["tokens_today"]["credits"]["cache_read"] == 1920
    assert usage["tokens_today"]["credits"]["credits_micro"] == expected
    assert usage["credits"]["charged_micro"] == expected
    # ledger == balance: the charge is the whole balance change
    totals = gw.runtime.repo.ledger_totals(acc["id"])
    assert await gw.runtime.counters.get_balance(acc["id"]) == totals["balance"] == 5_000_000 - expected


async def test_cached_anthropic_answer_bills_reads_and_both_write_durations(gw):
    gw.mocks["alpha"].control(usage=usage_of("anthropic_message_cached.json"))
    acc = await account(gw, credits=5)
    key = await new_key(gw, acc)
    r = await chat(gw, key["key"], model="cached-claude")
    assert r.status_code == 200 and r.headers["x-trex-upstream-provider"] == "claude"
    assert r.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 30000, "cache_write_tokens": 2000}
    charges, logs = await _settled(gw, acc["id"])
    # catalog prices for claude-sonnet-4-5: 3 / 15, cache read 0.30, write 3.75 (5 min), 6 (1 h)
    expected = 1200 * 3 + 3000 * 3 + 1500 * 3.75 + 500 * 6 + 500 * 15
    assert charges[0]["amount_micro"] == -int(expected)
    assert charges[0]["tokens"]["cache_write"] == 1500 and charges[0]["tokens"]["cache_write_1h"] == 500
    assert (logs[0]["tokens_in"], logs[0]["tokens"]["cache_write_1h"]) == (33200, 500)


async def test_streamed_anthropic_answer_is_billed_per_class(gw):
    gw.mocks["alpha"].control(usage=usage_of("anthropic_message_cached.json"))
    acc = await account(gw, credits=5)
    key = await new_key(gw, acc)
    r = await chat(gw, key["key"], model="cached-claude", stream=True)
    assert r.status_code == 200 and b"[DONE]" in r.content
    charges, _ = await _settled(gw, acc["id"])
    assert charges[0]["amount_micro"] == -int(1200 * 3 + 30000 * 0.3 + 1500 * 3.75 + 500 * 6 + 500 * 15)


async def test_quota_counts_every_token_unless_the_plan_says_uncached(gw):
    gw.mocks["alpha"].control(usage=usage_of("openai_chat_cached.json"))
    gw.mocks["beta"].control(usage=usage_of("openai_chat_cached.json"))
    for plan, counted in (("free", 2306), ("cache-friendly", 2306 - 1920)):
        acc = await account(gw, plan=plan)
        key = await new_key(gw, acc)
        assert (await chat(gw, key["key"], max_tokens=10)).status_code == 200
        usage = (await gw.get(f"/admin/v1/accounts/{acc['id']}/usage", headers=OP)).json()
        assert usage["quota"]["tokens_used"] == counted, plan
