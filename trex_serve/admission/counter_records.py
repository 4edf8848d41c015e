"""The shapes of one admission and one settlement in the counter store: what the caller asks, what
the Lua scripts answer, and how their raw replies are read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Billing = Literal["quota", "credits"]


def _s(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)



@dataclass(slots=True)
class AdmitRequest:
    """One admission. Limits: ``None`` or 0 = unlimited (rpm, tpm, concurrency); quota limits and
    caps: ``None`` = none (0 is a real limit). Caps and reservation are in micro-credits."""

    request_id: str  # unique per request; also the lease id and the settlement handle
    key_id: str
    account_id: str
    billing: Billing = "quota"  # the caller's decision; a burst slot forces "credits"
    rpm: int | None = None
    tpm: int | None = None
    tokens_estimate: int = 0  # prompt estimate + max output: counted against TPM and quota tokens
    concurrency: int | None = None  # base concurrent requests of the key
    burst_concurrency: int | None = None  # above base and below this: slot "burst", billed in credits
    lease_ttl_s: float = 300.0  # a lease not settled or renewed within this is reclaimed
    quota_requests: int | None = None  # per account per UTC day
    quota_tokens: int | None = None
    reserve_micro: int = 0  # credit reservation (billing.reserve_micro); also used for a burst slot
    key_daily_cap_micro: int | None = None
    key_monthly_cap_micro: int | None = None
    account_daily_cap_micro: int | None = None
    account_monthly_cap_micro: int | None = None
    alert_at: float | None = 0.8  # fraction of a cap that emits a SpendAlert once per period
    now: float | None = None  # epoch seconds; None = the Redis server's clock


@dataclass(frozen=True, slots=True)
class SpendAlert:
    scope: Literal["key", "account"]
    period: Literal["day", "month"]
    cap_micro: int
    spent_micro: int  # spent in the period after this admission (reservations included)


@dataclass(slots=True)
class AdmitResult:
    ok: bool
    code: str | None = None  # on refusal: one of the codes above
    retry_after: int | None = None  # seconds (>= 1) for rate/concurrency/quota/spend refusals
    billing: Billing | None = None
    slot: Literal["base", "burst"] | None = None
    lease_id: str | None = None  # == request_id when admitted
    reserved_micro: int = 0
    balance_after: int | None = None  # available micro-credits after the reservation (credits)
    rpm_limit: int | None = None
    rpm_remaining: int | None = None
    rpm_reset: int = 60  # seconds to the end of the RPM window
    alerts: list[SpendAlert] = field(default_factory=list)
    cap_hit: SpendAlert | None = None  # on spend_limit_exceeded: the first cap that refused
    duplicate: bool = False  # a retried admission of an already-admitted request_id
    replay: bool = False  # this request_id was settled before: serve it again, reserve and charge nothing

    def rate_limit_headers(self) -> dict[str, str]:
        """The X-RateLimit-*-Requests headers of CONTRACT.md section 1 (empty when unlimited)."""
        if not self.rpm_limit:
            return {}
        headers = {
            "X-RateLimit-Limit-Requests": str(self.rpm_limit),
            "X-RateLimit-Reset-Requests": f"{self.rpm_reset}s",
        }
        if self.rpm_remaining is not None:
            headers["X-RateLimit-Remaining-Requests"] = str(self.rpm_remaining)
        return headers


@dataclass(slots=True)
class SettleRequest:
    request_id: str
    success: bool = True  # False: the request failed overall and costs nothing
    tokens_in: int = 0  # actual usage (what was delivered, for a stream cut by the client)
    tokens_out: int = 0
    charge_micro: int = 0  # actual cost for credit billing (billing.cost_micro); ignored for quota
    velocity_window_s: int | None = None
    velocity_max_micro: int | None = None
    now: float | None = None
    replay_ttl_s: int = 0  # > 0: mark a successful settlement so a replay of this id is not charged again
    reason: str = ""  # text of the ledger row a charge appends (lua/settle.lua)
    usage: dict[str, int] | None = None  # tokens by class (Usage.classes()), kept on the ledger row


@dataclass(slots=True)
class SettleResult:
    settled: bool  # False: unknown request_id or already settled (nothing was done)
    billing: Billing | None = None
    charged_micro: int = 0  # taken in total (may exceed the reservation only within balance/caps)
    refunded_micro: int = 0  # returned to the balance out of the reservation
    balance_after: int | None = None
    velocity_exceeded: bool = False  # the key's rolling-window spend is over the maximum: suspend it
    velocity_micro: int = 0  # the key's spend in the rolling window, this charge included


def _parse_alert(raw: Sequence[Any]) -> SpendAlert:
    return SpendAlert(
        scope=_s(raw[0]),  # type: ignore[arg-type]
        period="day" if _s(raw[1]) == "d" else "month",
        cap_micro=int(raw[2]),
        spent_micro=int(raw[3]),
    )


def _parse_admit(req: AdmitRequest, raw: Sequence[Any]) -> AdmitResult:
    ok = int(raw[0]) == 1
    rpm_limit = int(raw[7]) or None
    remaining = int(raw[8])
    res = AdmitResult(
        ok=ok,
        rpm_limit=rpm_limit,
        rpm_remaining=None if remaining < 0 else remaining,
        rpm_reset=int(raw[9]),
        duplicate=int(raw[12]) == 1,
        replay=int(raw[12]) == 2,
    )
    if ok:
        res.billing = _s(raw[3])  # type: ignore[assignment]
        res.slot = _s(raw[4])  # type: ignore[assignment]
        res.lease_id = None if res.replay else req.request_id
        res.reserved_micro = int(raw[5])
        bal = int(raw[6])
        res.balance_after = None if bal < 0 else bal
        res.alerts = [_parse_alert(a) for a in raw[10]]
    else:
        res.code = _s(raw[1])
        retry = int(raw[2])
        res.retry_after = retry if retry > 0 else None
        if raw[11]:
            res.cap_hit = _parse_alert(raw[11])
    return res


def _parse_settle(raw: Sequence[Any]) -> SettleResult:
    if int(raw[0]) != 1:
        return SettleResult(settled=False)
    bal = int(raw[4])
    return SettleResult(
        settled=True,
        billing=_s(raw[1]),  # type: ignore[arg-type]
        charged_micro=int(raw[2]),
        refunded_micro=int(raw[3]),
        balance_after=None if bal < 0 else bal,
        velocity_exceeded=int(raw[5]) == 1,
        velocity_micro=int(raw[6]),
    )
