"""Billing arithmetic: exact micro-credit costs, reservations, settlement amounts, UTC periods,
and a property test of settle sequences against the invariants the counter store keeps."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trex_serve.billing.pricing import (
    cost_micro,
    credits_from_micro,
    micro_from_credits,
    reserve_micro,
    seconds_to_month_end,
    seconds_to_utc_midnight,
    seconds_to_window_end,
    settle_amounts,
    tokens_estimate,
    utc_day,
    utc_month,
)


def _ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def test_cost_micro_exact() -> None:
    assert cost_micro(100, 0, 0.15, 0.60) == 15  # not 16 from 15.000000000000002
    assert cost_micro(1_000_000, 1_000_000, 0.15, 0.60) == 750_000
    assert cost_micro(1, 1, 0.15, 0.60) == 1  # 0.75 rounds up
    assert cost_micro(3, 0, "0.1", 0) == 1
    assert cost_micro(0, 0, 5, 15) == 0
    assert cost_micro(123_456, 7_890, Decimal("2.5"), Decimal("10")) == 387_540
    with pytest.raises(ValueError):
        cost_micro(-1, 0, 1, 1)
    with pytest.raises(ValueError):
        cost_micro(1, 0, -1, 1)
    with pytest.raises(ValueError):
        cost_micro(1, 0, float("nan"), 1)


@given(st.integers(0, 10**7), st.integers(0, 10**7), st.decimals(0, 1000, places=4), st.decimals(0, 1000, places=4))
def test_cost_micro_is_the_ceiling(tin: int, tout: int, pin: Decimal, pout: Decimal) -> None:
    micro = cost_micro(tin, tout, pin, pout)
    exact = tin * pin + tout * pout
    assert micro - 1 < exact <= micro


def test_credit_conversions_and_reservations() -> None:
    assert micro_from_credits(12.5) == 12_500_000
    assert micro_from_credits("0.0000005") == 1
    assert credits_from_micro(1_500_000) == Decimal("1.5")
    assert reserve_micro(1000, 500, 1, 2) == 2000
    assert reserve_micro(1000, None, 1, 2, default_output_tokens=10) == 1020
    assert reserve_micro(1000, 5000, 1, 2, context_window=1500) == 2000
    assert tokens_estimate(100, None, default_output_tokens=50) == 150
    assert tokens_estimate(100, 20) == 120


def test_periods() -> None:
    assert seconds_to_utc_midnight(_ts(2024, 2, 29, 23, 59, 30)) == 30
    assert seconds_to_utc_midnight(_ts(2024, 3, 1)) == 86400
    assert seconds_to_utc_midnight(_ts(2024, 3, 1) - 0.25) == 1
    assert seconds_to_utc_midnight(datetime(2024, 3, 1, 12)) == 43200  # naive = UTC
    assert seconds_to_month_end(_ts(2024, 2, 29, 12)) == 43200
    assert seconds_to_month_end(_ts(2024, 12, 31, 23, 0)) == 3600
    assert seconds_to_month_end(_ts(2023, 2, 1)) == 28 * 86400
    assert seconds_to_window_end(_ts(2024, 1, 1, 0, 0, 15)) == 45
    assert seconds_to_window_end(_ts(2024, 1, 1, 0, 0, 59, 900000)) == 1
    assert utc_day(_ts(2024, 2, 29, 23, 59, 59)) == "20240229"
    assert utc_month(_ts(2024, 12, 31, 23, 59, 59)) == "202412"
    assert 1 <= seconds_to_utc_midnight() <= 86400


def test_settle_amounts() -> None:
    s = settle_amounts(300, 120, 700)
    assert (s.charged, s.refunded, s.delta) == (120, 180, -180)
    s = settle_amounts(100, 130, 1000)
    assert (s.charged, s.refunded, s.delta) == (130, 0, 30)
    s = settle_amounts(100, 500, 50)  # extra clamped by the balance
    assert (s.charged, s.refunded, s.delta) == (150, 0, 50)
    s = settle_amounts(100, 500, 1000, cap_headroom=20)  # ... and by a spend cap
    assert (s.charged, s.refunded, s.delta) == (120, 0, 20)
    s = settle_amounts(100, 0, None)
    assert (s.charged, s.refunded, s.delta) == (0, 100, -100)


_step = st.tuples(
    st.integers(0, 10_000),  # reservation asked
    st.sampled_from(["success", "failure", "over", "under"]),
    st.integers(0, 20_000),
    st.booleans(),  # settle at once, or later (interleaving)
)


@given(
    initial=st.integers(0, 100_000),
    cap=st.one_of(st.none(), st.integers(0, 50_000)),
    steps=st.lists(_step, max_size=60),
)
def test_settle_sequences_keep_invariants(initial: int, cap: int | None, steps) -> None:
    """A model of the store (admission check + settle_amounts): the balance never goes negative,
    spending never passes the cap, and initial - sum(charged) == final once all are settled."""
    balance, spent, charged_total, pending = initial, 0, 0, []

    def settle(reserved: int, outcome: str, amount: int) -> None:
        nonlocal balance, spent, charged_total
        charge = {"success": min(reserved, amount), "failure": 0, "over": reserved + amount, "under": reserved // 3}[
            outcome
        ]
        s = settle_amounts(reserved, charge, balance, None if cap is None else cap - spent)
        assert s.charged >= 0 and s.refunded >= 0 and s.charged + s.refunded >= reserved
        assert s.charged <= charge
        balance -= s.delta
        spent += s.delta
        charged_total += s.charged
        assert balance >= 0
        assert cap is None or spent <= cap

    for reserved, outcome, amount, now in steps:
        if balance <= 0 or balance < reserved or (cap is not None and spent + reserved > cap):
            continue  # refused, nothing changed
        balance -= reserved
        spent += reserved
        pending.append((reserved, outcome, amount))
        if now:
            settle(*pending.pop())
    for item in pending:
        settle(*item)
    assert balance == initial - charged_total
    assert spent == charged_total
