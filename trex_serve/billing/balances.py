"""The credit figures an account reads (operator API, account API, dashboard): read your writes.

The SQL ledger lags the live balance in Redis by the ledger stream (durable_streams.py) and in-flight
reservations are taken from the live balance at admission. So the balance shown is the live Redis
balance when Redis has one (every answered request is in it the moment it was answered), and the
ledger's when it has not (Redis down or the balance not loaded yet). ``charged`` includes the charges
still on their way to the ledger, and ``reserved`` is what requests in flight hold, so that
``granted - charged + refunded + adjusted - reserved == balance`` at every moment."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from trex_serve.store.repository import credits


class BookingReader(Protocol):
    async def booking_state(self, account_id: str) -> tuple[int, bool]: ...


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


def apply_live(out: dict[str, Any], live: dict[str, Any]) -> None:
    """Put the live figures (``Runtime._usage``: quota, ``live_balance_micro``, and the SQL
    ledger's totals with ``unbooked_micro``, read together by :func:`booked_totals`) into a usage
    answer with the credit view built from them."""
    unbooked = int(live.pop("unbooked_micro", 0) or 0)
    totals = live.pop("ledger_totals")
    out.update(live)
    out["credits"] = credit_view(totals, out.get("live_balance_micro"), unbooked)


async def booked_totals(counters: BookingReader, ledger_totals: Callable[[str], dict[str, int]],
                        account_id: str, tries: int = 10) -> tuple[dict[str, int], int]:
    """The SQL ledger's totals (``ledger_totals``, blocking: run in a thread) and the charges not in
    it yet, read so that no charge is in both or in neither. A drainer commits a batch to SQL before
    its acknowledgement lowers ``unbooked``, so the pair is taken only when no batch of this account
    was on its way (``streams.booking_key``) and ``unbooked`` did not move across the SQL read."""
    for attempt in range(tries):
        unbooked, busy = await counters.booking_state(account_id)
        if not busy:
            totals = await asyncio.to_thread(ledger_totals, account_id)
            if await counters.booking_state(account_id) == (unbooked, False):
                return totals, unbooked
        if attempt < tries - 1:
            await asyncio.sleep(0.01 * (attempt + 1))
    # Charges settling without pause, or a drainer that died holding the mark: the last read.
    totals = await asyncio.to_thread(ledger_totals, account_id)
    return totals, (await counters.booking_state(account_id))[0]
