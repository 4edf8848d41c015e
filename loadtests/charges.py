"""The money check of the suites that take part of the gateway away under load (a node, the Redis
primary): the ledger charged exactly what the 200 answers billed in credits cost at the gateway's
prices (an answer left uncharged makes it smaller, a request charged twice larger), and the live
balance equals the ledger balance once the ledger stream has drained into SQL."""

from __future__ import annotations

import time
from typing import Any

from loadtests.common import Record


def check_charges(ctx: Any, recs: list[Record], before: dict[str, Any], what: str, timeout_s: float) -> None:
    """``ctx`` is the suite's context (catalog prices, operator API, account, misses and notes);
    ``before`` the account's usage read before the run."""
    ok = [r for r in recs if r.status == 200 and not r.exception]
    credited = [r for r in ok if r.headers.get("x-trex-billing") == "credits"]
    ctx.check(bool(credited), f"{what}: no 200 answer was billed in credits (nothing to check)")
    expected = sum(ctx.catalog.cost_micro(r.model, r.usage or {}, r.provider,
                                          r.headers.get("x-trex-upstream-model"), ctx.args.plan)
                   for r in credited)
    b0 = before["credits"]
    deadline = time.time() + timeout_s
    while True:  # the ledger is written behind the answers (a Redis stream drained into SQL)
        after = ctx.admin.usage(ctx.account["id"])
        charged = after["credits"]["charged_micro"] - b0["charged_micro"]
        ledger = after["credits"].get("ledger_balance_micro", after["credits"]["balance_micro"])
        live = after.get("live_balance_micro")
        if (charged == expected and live == ledger) or time.time() > deadline:
            break
        time.sleep(0.3)
    ctx.check(charged == expected, f"{what}: the ledger charged {charged} micro-credits, the {len(credited)} "
              f"credit-billed 200 answers cost {expected} (diff {charged - expected}: < 0 an answer went "
              "uncharged, > 0 a request was charged twice or a refused one was charged)")
    ctx.check(live == ledger, f"{what}: live balance {live} != ledger balance {ledger}")
    ctx.notes.append(f"money: {len(credited)} credit-billed answers, ledger charged {charged} micro "
                     f"(expected {expected}); balance {ledger} micro, live {live}")
