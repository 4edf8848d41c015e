"""Billing arithmetic, pure and exact: micro-credit costs, reservations, settlement amounts and the
UTC period boundaries (day, calendar month) that quotas and spend caps reset on.

1 Compute Credit = 1_000_000 micro-credits. Prices are Compute Credits per 1M tokens, so a price
is also micro-credits per token: ``micro = ceil(tokens_in * price_in + tokens_out * price_out)``.
All arithmetic goes through :class:`decimal.Decimal` of the price's shortest repr, so
``100 tokens * 0.15`` is 15, never 16 from a binary-float residue.

The settlement rule here (:func:`settle_amounts`) is the one ``lua/_common.lua`` applies in Redis;
tests check the two against each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from functools import lru_cache

from trex_serve.providers.usage import Usage

MICRO_PER_CREDIT = 1_000_000

# Output tokens reserved when a request names no max_tokens (the caller may pass its own default).
DEFAULT_OUTPUT_RESERVE_TOKENS = 4096


def _dec(value: float | int | str | Decimal) -> Decimal:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, float):
        return _dec_float(value)
    return Decimal(value)


@lru_cache(maxsize=1024)
def _dec_float(value: float) -> Decimal:
    # The catalog's few prices, converted on every admission and settlement: cached.
    if not math.isfinite(value):
        raise ValueError(f"price must be finite, got {value!r}")
    return Decimal(repr(value))


def cost_micro(
    tokens_in: int,
    tokens_out: int,
    price_in_per_mtok: float | Decimal | str,
    price_out_per_mtok: float | Decimal | str,
) -> int:
    """Micro-credits for a usage at catalog prices (credits per 1M tokens), rounded up."""
    if tokens_in < 0 or tokens_out < 0:
        raise ValueError("token counts must be >= 0")
    p_in, p_out = _dec(price_in_per_mtok), _dec(price_out_per_mtok)
    if p_in < 0 or p_out < 0:
        raise ValueError("prices must be >= 0")
    total = Decimal(int(tokens_in)) * p_in + Decimal(int(tokens_out)) * p_out
    return int(total.to_integral_value(rounding=ROUND_CEILING))


@dataclass(frozen=True, slots=True)
class ClassPrices:
    """Credits per 1M tokens for each token class a provider bills apart (see providers/usage.py)."""

    input: Decimal
    output: Decimal
    cache_read: Decimal
    cache_write: Decimal
    cache_write_1h: Decimal
    reasoning: Decimal


def charge_micro(usage: Usage, prices: ClassPrices) -> int:
    """Micro-credits for a usage, each token class at its own price, rounded up once."""
    reasoning = min(max(0, usage.reasoning_tokens), max(0, usage.output_tokens))
    total = (Decimal(max(0, usage.input_tokens)) * prices.input
             + Decimal(max(0, usage.cache_read_tokens)) * prices.cache_read
             + Decimal(max(0, usage.cache_write_tokens)) * prices.cache_write
             + Decimal(max(0, usage.cache_write_1h_tokens)) * prices.cache_write_1h
             + Decimal(max(0, usage.output_tokens) - reasoning) * prices.output
             + Decimal(reasoning) * prices.reasoning)
    return int(total.to_integral_value(rounding=ROUND_CEILING))


def micro_from_credits(credits: float | int | str | Decimal) -> int:
    """Credits (as an operator types them: 12.5) to integer micro-credits, rounded half up."""
    value = _dec(credits) * MICRO_PER_CREDIT
    return int(value.to_integral_value(rounding=ROUND_HALF_UP))


def credits_from_micro(micro: int) -> Decimal:
    """Integer micro-credits to an exact Decimal credit amount (for display and the API)."""
    return Decimal(int(micro)) / MICRO_PER_CREDIT


def reserve_micro(
    prompt_tokens: int,
    max_output_tokens: int | None,
    price_in_per_mtok: float | Decimal | str,
    price_out_per_mtok: float | Decimal | str,
    *,
    default_output_tokens: int = DEFAULT_OUTPUT_RESERVE_TOKENS,
    context_window: int | None = None,
) -> int:
    """The credit reservation taken at admission: the prompt estimate plus the most output the
    request may produce (``max_output_tokens``, else ``default_output_tokens``, never beyond what
    the model's context window leaves after the prompt)."""
    prompt_tokens = max(0, int(prompt_tokens))
    out = default_output_tokens if max_output_tokens is None else max(0, int(max_output_tokens))
    if context_window is not None:
        out = max(0, min(out, int(context_window) - prompt_tokens))
    return cost_micro(prompt_tokens, out, price_in_per_mtok, price_out_per_mtok)


def tokens_estimate(
    prompt_tokens: int, max_output_tokens: int | None, *, default_output_tokens: int = DEFAULT_OUTPUT_RESERVE_TOKENS
) -> int:
    """Tokens counted against TPM and the daily token quota at admission (settled to actual)."""
    out = default_output_tokens if max_output_tokens is None else max(0, int(max_output_tokens))
    return max(0, int(prompt_tokens)) + out


@dataclass(frozen=True, slots=True)
class SettleAmounts:
    charged: int  # micro-credits actually taken in total for the request
    refunded: int  # returned to the balance out of the reservation
    delta: int  # change applied at settlement to balance (-delta) and to spent counters (+delta)


def settle_amounts(reserved: int, charge: int, available: int | None, cap_headroom: int | None = None) -> SettleAmounts:
    """Settlement of one credit-billed request.

    ``reserved`` was taken at admission; ``charge`` is the actual cost (0 for a failed request);
    ``available`` is the balance left now (``None`` when the balance key is gone);
    ``cap_headroom`` is the smallest ``cap - spent`` over the capped scopes (``None``: no cap).
    Under the reservation the difference is refunded. Over it, the extra is taken only up to what
    the balance and the spend caps leave, so the balance never goes below zero and no cap is
    overshot; ``charged`` reports what was really taken.
    """
    reserved, charge = max(0, int(reserved)), max(0, int(charge))
    if charge <= reserved:
        return SettleAmounts(charged=charge, refunded=reserved - charge, delta=charge - reserved)
    extra = charge - reserved
    extra = min(extra, max(0, int(available or 0)))
    if cap_headroom is not None:
        extra = min(extra, max(0, int(cap_headroom)))
    return SettleAmounts(charged=reserved + extra, refunded=0, delta=extra)


# ---------------------------------------------------------------------------------------------
# UTC periods


def _epoch(now: float | datetime | None) -> float:
    if now is None:
        return datetime.now(UTC).timestamp()
    if isinstance(now, datetime):
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        return now.timestamp()
    return float(now)


def _ceil_at_least_1(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def seconds_to_window_end(now: float | datetime | None = None, window_s: int = 60) -> int:
    """Seconds (integer >= 1) until the fixed window containing ``now`` ends."""
    t = _epoch(now)
    return _ceil_at_least_1((math.floor(t / window_s) + 1) * window_s - t)


def seconds_to_utc_midnight(now: float | datetime | None = None) -> int:
    """Seconds (integer >= 1) until the next 00:00 UTC: a daily quota's or daily cap's reset."""
    t = _epoch(now)
    return _ceil_at_least_1((math.floor(t / 86400) + 1) * 86400 - t)


def seconds_to_month_end(now: float | datetime | None = None) -> int:
    """Seconds (integer >= 1) until the first of the next month, 00:00 UTC: a monthly cap's reset."""
    t = _epoch(now)
    d = datetime.fromtimestamp(math.floor(t / 86400) * 86400, UTC)
    nxt = datetime(d.year + 1, 1, 1, tzinfo=UTC) if d.month == 12 else datetime(d.year, d.month + 1, 1, tzinfo=UTC)
    return _ceil_at_least_1(nxt.timestamp() - t)


def utc_day(now: float | datetime | None = None) -> str:
    """``yyyymmdd`` of the UTC day containing ``now`` (the quota and daily-spend key suffix)."""
    return datetime.fromtimestamp(math.floor(_epoch(now) / 86400) * 86400, UTC).strftime("%Y%m%d")


def start_of_utc_day(now: float | datetime | None = None) -> datetime:
    """00:00 UTC of the day containing ``now`` (where "today" starts for usage figures)."""
    return datetime.fromtimestamp(math.floor(_epoch(now) / 86400) * 86400, UTC)


def utc_month(now: float | datetime | None = None) -> str:
    """``yyyymm`` of the UTC month containing ``now`` (the monthly-spend key suffix)."""
    return utc_day(now)[:6]
