"""The credit figures an account reads (operator API, account API, dashboard): read your writes.

The SQL ledger lags the live balance in Redis by the ledger stream (streams.py) and in-flight
reservations are taken from the live balance at admission. So the balance shown is the live Redis
balance when Redis has one (every answered request is in it the moment it was answered), and the
ledger's when it has not (Redis down or the balance not loaded yet). ``charged`` includes the charges
still on their way to the ledger, and ``reserved`` is what requests in flight hold, so that
``granted - charged + refunded + adjusted - reserved == balance`` at every moment."""

from __future__ import annotations

from typing import Any

from trex_serve.store.repository import credits


def credit_view(totals: dict[str, int], live: int | None = None, unbooked: int = 0) -> dict[str, Any]:
    """``totals`` from ``Repository.ledger_totals``; ``live`` the Redis balance (None: unknown);
    ``unbooked`` the account's charges settled in Redis and not yet in SQL."""
    figures = dict(totals)
    ledger_balance = figures["balance"]
    settled = ledger_balance - unbooked
    figures["charged"] = figures.get("charged", 0) + unbooked
    figures["ledger_balance"] = ledger_balance
    if live is None:
        figures["balance"], figures["reserved"] = settled, 0
    else:
        figures["balance"], figures["reserved"] = live, max(0, settled - live)
    view: dict[str, Any] = {name: credits(value) for name, value in figures.items()}
    view.update({f"{name}_micro": value for name, value in figures.items()})
    view["balance_source"] = "ledger" if live is None else "live"
    return view


def apply_live(out: dict[str, Any], totals: dict[str, int], live: dict[str, Any]) -> None:
    """Put the live figures (``Runtime._usage``: quota, ``live_balance_micro``, ``unbooked_micro``)
    into a usage answer and rebuild its credit view from them."""
    unbooked = int(live.pop("unbooked_micro", 0) or 0)
    out.update(live)
    out["credits"] = credit_view(totals, out.get("live_balance_micro"), unbooked)
