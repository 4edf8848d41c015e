"""`trex-serve billing reconcile`: the SQL ledger is the record, Redis holds the fast copy of each
balance. Charges settled in Redis whose ledger rows still wait in the ledger stream
(billing/durable_streams.py) are counted per account in Redis (``unbooked``), so at rest (nothing
in flight) ``live == ledger - unbooked`` must hold exactly, even while the database is behind; this
reports every difference and, with --fix, resets Redis from the ledger (minus what is still on its
way to it)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from trex_serve.admission.counters import CounterStore
from trex_serve.billing.durable_streams import stream_key
from trex_serve.observability.metrics_exchange import RECONCILE_KEY
from trex_serve.settings import Settings
from trex_serve.store.database import create_engine
from trex_serve.store.repository import Repository


async def reconcile(database_url: str, redis_url: str, secret_key: str, fix: bool = False,
                    prefix: str = "trex:") -> dict[str, Any]:
    engine = create_engine(database_url or None)
    repo = Repository(engine, secret_key or "unused-for-reconcile")
    # A balance fixed here waits for the replicas as the gateway's writes do (TREX_REDIS_WAIT_REPLICAS).
    counters = CounterStore.from_url(redis_url, prefix=prefix, durability=Settings.from_env().durability())
    try:
        ledger = await asyncio.to_thread(repo.all_balances)
        rows = []
        for account_id, booked in sorted(ledger.items()):
            unbooked = await counters.unbooked(account_id)
            live = await counters.get_balance(account_id)
            expected = booked - unbooked
            row = {"account_id": account_id, "ledger_micro": booked, "unbooked_micro": unbooked,
                   "redis_micro": live, "difference_micro": None if live is None else live - expected}
            if fix and live != expected:
                await counters.set_balance(account_id, expected)
                row["fixed"] = True
            rows.append(row)
        mismatched = [r for r in rows if r["difference_micro"] not in (0, None)]
        backlog = int(await counters.client.xlen(stream_key(prefix, "ledger")))
        # The gateway's /metrics shows the outcome (trex_reconcile_*), so an alert can page on it.
        await counters.client.hset(f"{prefix}{RECONCILE_KEY}", mapping={
            "at": time.time(), "accounts": len(rows), "mismatched": 0 if fix else len(mismatched)})
        return {"accounts": len(rows), "mismatched": len(mismatched), "not_loaded": sum(
            1 for r in rows if r["redis_micro"] is None), "ledger_stream_backlog": backlog,
            "rows": mismatched if mismatched else rows[:20]}
    finally:
        await counters.aclose()
        engine.dispose()


def run(database_url: str, redis_url: str, secret_key: str, fix: bool) -> int:
    report = asyncio.run(reconcile(database_url, redis_url, secret_key, fix))
    print(json.dumps(report, indent=2, default=str))
    return 1 if report["mismatched"] and not fix else 0
