"""The shared counter store against a real Redis: exactness under concurrency (coroutines and
processes), quota, credits, spend caps, velocity, the failed-auth throttle, idempotency, NOSCRIPT
recovery and fail-closed behaviour."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trex_serve.admission.counters import AdmitRequest, CounterStore, SettleRequest
from trex_serve.billing.pricing import seconds_to_month_end, seconds_to_utc_midnight, settle_amounts
from trex_serve.errors import ServiceUnavailable
from trex_serve.local.embedded import free_port, start_redis


def _ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def _rid() -> str:
    return uuid.uuid4().hex


@pytest.fixture(params=[(True, True), (False, True), (True, False)],
                ids=["group-commit", "direct", "group-commit-redis-py"])
async def store(request, redis_url: str, key_prefix: str):
    """The script calls over the lean connection (lean_redis.py), grouped per event-loop turn or
    one by one, and over redis-py's pool (what a TLS URL uses)."""
    group_commit, lean = request.param
    s = CounterStore.from_url(redis_url, key_prefix, group_commit=group_commit, lean=lean)
    assert (s._lean is not None) == lean
    yield s
    await s.aclose()


@pytest.fixture
async def gstore(redis_url: str, key_prefix: str):
    s = CounterStore.from_url(redis_url, key_prefix)
    yield s
    await s.aclose()


# ---------------------------------------------------------------------------------------------
# RPM across processes


def _rpm_worker(url: str, prefix: str, now: float, barrier, out) -> None:
    async def main() -> int:
        s = CounterStore.from_url(url, prefix)
        try:
            barrier.wait(10)
            results = await asyncio.gather(
                *[s.admit(AdmitRequest(_rid(), "k", "a", rpm=37, now=now)) for _ in range(50)]
            )
            assert all(r.ok or r.code == "rate_limit_exceeded" for r in results)
            return sum(r.ok for r in results)
        finally:
            await s.aclose()

    out.put(asyncio.run(main()))


def test_rpm_exact_across_processes(redis_url: str, key_prefix: str) -> None:
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    now = time.time()
    procs = [ctx.Process(target=_rpm_worker, args=(redis_url, key_prefix, now, barrier, out)) for _ in range(4)]
    for p in procs:
        p.start()
    admitted = [out.get(timeout=20) for _ in procs]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    assert sum(admitted) == 37


async def test_rpm_refusal_headers_and_next_window(store: CounterStore) -> None:
    now = _ts(2024, 5, 1, 10, 0, 15)
    first = await store.admit(AdmitRequest(_rid(), "k", "a", rpm=2, now=now))
    assert first.ok and first.rpm_limit == 2 and first.rpm_remaining == 1 and first.rpm_reset == 45
    assert first.rate_limit_headers()["X-RateLimit-Remaining-Requests"] == "1"
    assert (await store.admit(AdmitRequest(_rid(), "k", "a", rpm=2, now=now))).ok
    refused = await store.admit(AdmitRequest(_rid(), "k", "a", rpm=2, now=now + 0.5))
    assert refused.code == "rate_limit_exceeded" and refused.retry_after == 45
    assert refused.rpm_remaining == 0 and refused.lease_id is None
    assert await store.inflight("k", now=now) == 2  # the refusal left no lease
    assert (await store.admit(AdmitRequest(_rid(), "k", "a", rpm=2, now=now + 45))).ok


async def test_tpm_window(store: CounterStore) -> None:
    now = _ts(2024, 5, 1, 10, 0, 59, 500000)
    r1 = await store.admit(AdmitRequest(_rid(), "k", "a", tpm=1000, tokens_estimate=600, now=now))
    assert r1.ok
    r2 = await store.admit(AdmitRequest(_rid(), "k", "a", tpm=1000, tokens_estimate=600, now=now))
    assert r2.code == "rate_limit_exceeded" and r2.retry_after == 1
    # settling the first at its actual (100) frees the difference in the same window
    await store.settle(SettleRequest(r1.lease_id, tokens_in=60, tokens_out=40, now=now))
    assert (await store.admit(AdmitRequest(_rid(), "k", "a", tpm=1000, tokens_estimate=600, now=now))).ok


# ---------------------------------------------------------------------------------------------
# concurrency leases


async def test_concurrency_leases_exact(store: CounterStore) -> None:
    now = time.time()
    reqs = [AdmitRequest(_rid(), "k", "a", concurrency=5, now=now) for _ in range(20)]
    results = await asyncio.gather(*[store.admit(r) for r in reqs])
    ok = [r for r in results if r.ok]
    assert len(ok) == 5 and all(r.slot == "base" for r in ok)
    assert all(r.code == "concurrency_limit_exceeded" and r.retry_after == 1 for r in results if not r.ok)
    assert await store.inflight("k", now=now) == 5
    settled = await asyncio.gather(*[store.settle(SettleRequest(r.lease_id, now=now)) for r in ok])
    assert all(s.settled for s in settled)
    assert await store.inflight("k", now=now) == 0
    assert (await store.admit(AdmitRequest(_rid(), "k", "a", concurrency=5, now=now))).ok


async def test_burst_slots_bill_credits(store: CounterStore) -> None:
    now = time.time()
    await store.ensure_balance("a", 1_000_000)
    reqs = [
        AdmitRequest(_rid(), "k", "a", concurrency=2, burst_concurrency=4, reserve_micro=1000, now=now)
        for _ in range(6)
    ]
    results = await asyncio.gather(*[store.admit(r) for r in reqs])
    slots = sorted((r.slot, r.billing) for r in results if r.ok)
    assert slots == [("base", "quota")] * 2 + [("burst", "credits")] * 2
    assert sum(r.code == "concurrency_limit_exceeded" for r in results) == 2
    assert await store.get_balance("a") == 1_000_000 - 2000


async def test_expired_leases_reclaimed_and_refunded(store: CounterStore) -> None:
    now = time.time()
    await store.ensure_balance("a", 10_000)
    dead = await store.admit(
        AdmitRequest(_rid(), "k", "a", concurrency=1, lease_ttl_s=10, billing="credits", reserve_micro=4000, now=now)
    )
    assert dead.ok and await store.get_balance("a") == 6000
    busy = await store.admit(AdmitRequest(_rid(), "k", "a", concurrency=1, now=now + 5))
    assert busy.code == "concurrency_limit_exceeded"
    assert await store.inflight("k", now=now + 11) == 0
    # the dead holder's lease is reaped by the next admission, its reservation refunded
    again = await store.admit(AdmitRequest(_rid(), "k", "a", concurrency=1, now=now + 11))
    assert again.ok
    assert await store.get_balance("a") == 10_000
    late = await store.settle(SettleRequest(dead.lease_id, charge_micro=4000, now=now + 12))
    assert not late.settled and await store.get_balance("a") == 10_000


async def test_renew_lease(gstore: CounterStore) -> None:
    r = await gstore.admit(AdmitRequest(_rid(), "k", "a", concurrency=1, lease_ttl_s=1))
    assert await gstore.renew_lease("k", r.lease_id, 60)
    await asyncio.sleep(1.1)
    assert await gstore.inflight("k") == 1
    await gstore.settle(SettleRequest(r.lease_id))
    assert not await gstore.renew_lease("k", r.lease_id, 60)


# ---------------------------------------------------------------------------------------------
# quota


async def test_quota_exhaustion_and_reset(store: CounterStore) -> None:
    now = _ts(2024, 2, 29, 23, 59, 30)  # leap day, 30 s before midnight
    day = AdmitRequest(_rid(), "k", "a", quota_requests=3, tokens_estimate=10, now=now)
    for _ in range(3):
        day.request_id = _rid()
        assert (await store.admit(day)).ok
    day.request_id = _rid()
    refused = await store.admit(day)
    assert refused.code == "insufficient_quota"
    assert refused.retry_after == 30 == seconds_to_utc_midnight(now)
    assert await store.quota_usage("a", now=now) == {"requests": 3, "tokens": 30}
    day.request_id, day.now = _rid(), now + 30  # 1 March: a new quota day
    assert (await store.admit(day)).ok
    assert await store.quota_usage("a", now=now + 30) == {"requests": 1, "tokens": 10}


async def test_quota_tokens_and_failed_request_refund(store: CounterStore) -> None:
    now = time.time()
    req = AdmitRequest(_rid(), "k", "a", quota_tokens=1000, tokens_estimate=600, now=now)
    first = await store.admit(req)
    assert first.ok and first.billing == "quota"
    req.request_id = _rid()
    assert (await store.admit(req)).code == "insufficient_quota"
    # a failed request costs nothing: count and tokens undone
    res = await store.settle(SettleRequest(first.lease_id, success=False, now=now))
    assert res.settled and res.billing == "quota"
    assert await store.quota_usage("a", now=now) == {"requests": 0, "tokens": 0}
    req.request_id = _rid()
    ok = await store.admit(req)
    assert ok.ok
    await store.settle(SettleRequest(ok.lease_id, tokens_in=200, tokens_out=50, now=now))
    assert await store.quota_usage("a", now=now) == {"requests": 1, "tokens": 250}


# ---------------------------------------------------------------------------------------------
# credits


async def test_credits_reserve_settle_refund(store: CounterStore) -> None:
    now = time.time()
    credit = {"billing": "credits", "now": now}
    missing = await store.admit(AdmitRequest(_rid(), "k", "a", reserve_micro=300_000, **credit))
    assert missing.code == "balance_missing"

    async def loader(account_id: str) -> int:
        assert account_id == "a"
        return 1_000_000

    r = await store.admit(AdmitRequest(_rid(), "k", "a", reserve_micro=300_000, **credit), loader)
    assert r.ok and r.reserved_micro == 300_000 and r.balance_after == 700_000
    s = await store.settle(SettleRequest(r.lease_id, charge_micro=120_000, now=now))
    assert (s.charged_micro, s.refunded_micro, s.balance_after) == (120_000, 180_000, 880_000)
    # under-estimated: the extra is charged too
    r = await store.admit(AdmitRequest(_rid(), "k", "a", reserve_micro=100_000, **credit))
    s = await store.settle(SettleRequest(r.lease_id, charge_micro=130_000, now=now))
    assert (s.charged_micro, s.refunded_micro, s.balance_after) == (130_000, 0, 750_000)
    # failed request: everything back
    r = await store.admit(AdmitRequest(_rid(), "k", "a", reserve_micro=500_000, **credit))
    s = await store.settle(SettleRequest(r.lease_id, success=False, charge_micro=999, now=now))
    assert (s.charged_micro, s.refunded_micro, s.balance_after) == (0, 500_000, 750_000)
    # too little: refused, nothing taken
    r = await store.admit(AdmitRequest(_rid(), "k", "a", reserve_micro=750_001, **credit))
    assert r.code == "insufficient_credits" and await store.get_balance("a") == 750_000
    # extra beyond the balance is clamped: the balance never goes below zero
    r = await store.admit(AdmitRequest(_rid(), "k", "a", reserve_micro=700_000, **credit))
    s = await store.settle(SettleRequest(r.lease_id, charge_micro=900_000, now=now))
    assert (s.charged_micro, s.balance_after) == (750_000, 0)
    assert (await store.admit(AdmitRequest(_rid(), "k", "a", reserve_micro=0, **credit))).code == (
        "insufficient_credits"
    )
    assert await store.spent("key", "k", now=now) == {"day": 1_000_000, "month": 1_000_000}
    assert await store.grant("a", 5_000) == 5_000
    assert await store.grant("nobody", 5_000) is None
    assert await store.set_balance("a", 42) == 5_000 and await store.get_balance("a") == 42


async def test_duplicate_admission_reserves_once(store: CounterStore) -> None:
    await store.ensure_balance("a", 10_000)
    req = AdmitRequest(_rid(), "k", "a", billing="credits", reserve_micro=3_000, rpm=10)
    first, again = await store.admit(req), await store.admit(req)
    assert first.ok and again.ok and again.duplicate and again.reserved_micro == 3_000
    assert await store.get_balance("a") == 7_000 and await store.rpm_used("k") == 1


async def test_settle_idempotent(store: CounterStore) -> None:
    now = time.time()
    await store.ensure_balance("a", 10_000)
    r = await store.admit(AdmitRequest(_rid(), "k", "a", billing="credits", reserve_micro=5_000, now=now))
    results = await asyncio.gather(
        *[store.settle(SettleRequest(r.lease_id, charge_micro=1_000, now=now)) for _ in range(5)]
    )
    assert sum(s.settled for s in results) == 1
    assert await store.get_balance("a") == 9_000
    assert not (await store.settle(SettleRequest("never-admitted"))).settled



async def test_replay_of_a_settled_request_is_served_without_a_second_charge(store: CounterStore) -> None:
    """The front proxy replays a request on another ingress replica when the first died before a byte
    of its answer left: if the first attempt had already settled, the replay costs nothing."""
    await store.ensure_balance("a", 10_000)
    req = AdmitRequest(_rid(), "k", "a", billing="credits", reserve_micro=3_000, rpm=10, concurrency=1)
    first = await store.admit(req)
    settled = await store.settle(SettleRequest(first.lease_id, charge_micro=2_000, replay_ttl_s=60))
    assert settled.charged_micro == 2_000 and await store.get_balance("a") == 8_000
    replay = await store.admit(req)
    assert replay.ok and replay.replay and replay.lease_id is None and replay.reserved_micro == 0
    assert replay.billing == "credits"
    again = await store.settle(SettleRequest(req.request_id, charge_micro=2_000, replay_ttl_s=60))
    assert not again.settled and again.charged_micro == 0
    assert await store.get_balance("a") == 8_000 and await store.rpm_used("k") == 1
    assert await store.inflight("k") == 0


async def test_replay_after_the_first_attempt_died_admitted_settles_once(store: CounterStore) -> None:
    """The first attempt was admitted on the replica that died (its lease still held): the replay takes
    over that admission, and its settlement is the only one."""
    await store.ensure_balance("a", 10_000)
    req = AdmitRequest(_rid(), "k", "a", billing="credits", reserve_micro=3_000, concurrency=1)
    await store.admit(req)
    replay = await store.admit(req)
    assert replay.ok and replay.duplicate and replay.lease_id == req.request_id
    assert (await store.settle(SettleRequest(req.request_id, charge_micro=1_000, replay_ttl_s=60))).charged_micro \
        == 1_000
    assert await store.get_balance("a") == 9_000 and await store.inflight("k") == 0


async def test_a_failed_first_attempt_leaves_no_mark_so_the_replay_is_billed_normally(store: CounterStore) -> None:
    await store.ensure_balance("a", 10_000)
    req = AdmitRequest(_rid(), "k", "a", billing="credits", reserve_micro=3_000)
    await store.admit(req)
    await store.settle(SettleRequest(req.request_id, success=False, replay_ttl_s=60))
    replay = await store.admit(req)
    assert replay.ok and not replay.replay and not replay.duplicate and replay.reserved_micro == 3_000
    assert await store.get_balance("a") == 7_000


async def test_ids_not_from_the_front_leave_no_mark(store: CounterStore) -> None:
    await store.ensure_balance("a", 10_000)
    req = AdmitRequest(_rid(), "k", "a", billing="credits", reserve_micro=3_000)
    await store.admit(req)
    await store.settle(SettleRequest(req.request_id, charge_micro=1_000))
    assert not (await store.admit(req)).replay

@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    initial=st.integers(0, 50_000),
    steps=st.lists(
        st.tuples(
            st.integers(0, 20_000),  # reservation
            st.sampled_from(["success", "failure", "over", "under"]),
            st.integers(0, 30_000),  # actual charge (scaled by the outcome)
            st.booleans(),  # settle now (True) or leave in flight for later
        ),
        max_size=25,
    ),
)
def test_credit_sequences_balance_exact(redis_url: str, initial: int, steps) -> None:
    async def run() -> None:
        s = CounterStore.from_url(redis_url, f"h{uuid.uuid4().hex[:10]}:")
        try:
            await s.ensure_balance("a", initial)
            now = time.time()
            model_balance, charged_total, pending = initial, 0, []

            async def settle_one(rid: str, reserved: int, outcome: str, amount: int) -> None:
                nonlocal model_balance, charged_total
                charge = {
                    "success": min(amount, reserved),
                    "failure": 0,
                    "over": reserved + amount,
                    "under": reserved // 2,
                }[outcome]
                res = await s.settle(SettleRequest(rid, success=outcome != "failure", charge_micro=charge, now=now))
                expect = settle_amounts(reserved, 0 if outcome == "failure" else charge, model_balance)
                assert res.settled and res.charged_micro == expect.charged
                model_balance -= expect.delta
                charged_total += res.charged_micro
                assert res.balance_after == model_balance >= 0

            for reserved, outcome, amount, settle_now in steps:
                rid = _rid()
                r = await s.admit(AdmitRequest(rid, "k", "a", billing="credits", reserve_micro=reserved, now=now))
                if not r.ok:
                    assert r.code == "insufficient_credits"
                    assert model_balance <= 0 or model_balance < reserved
                    continue
                model_balance -= reserved
                assert r.balance_after == model_balance >= 0
                pending.append((rid, reserved, outcome, amount))
                if settle_now:
                    await settle_one(*pending.pop())
            for item in pending:
                await settle_one(*item)
            final = await s.get_balance("a")
            assert final == model_balance == initial - charged_total >= 0
            assert await s.inflight("k", now=now) == 0
            assert (await s.spent("account", "a", now=now))["day"] == charged_total
        finally:
            await s.aclose()

    asyncio.run(run())


# ---------------------------------------------------------------------------------------------
# spend caps, alerts, velocity


async def test_spend_cap_never_overshot_and_alert_once(store: CounterStore) -> None:
    now = _ts(2024, 12, 31, 12, 0, 0)
    await store.ensure_balance("a", 10_000_000)
    reqs = [
        AdmitRequest(
            _rid(), "k", "a", billing="credits", reserve_micro=100, key_daily_cap_micro=1000, alert_at=0.8, now=now
        )
        for _ in range(30)
    ]
    results = await asyncio.gather(*[store.admit(r) for r in reqs])
    assert sum(r.ok for r in results) == 10
    refused = [r for r in results if not r.ok]
    assert all(r.code == "spend_limit_exceeded" for r in refused)
    assert refused[0].retry_after == 43200 == seconds_to_utc_midnight(now)
    assert refused[0].cap_hit.scope == "key" and refused[0].cap_hit.period == "day"
    alerts = [a for r in results for a in r.alerts]
    assert len(alerts) == 1 and alerts[0].spent_micro == 800 and alerts[0].cap_micro == 1000
    assert (await store.spent("key", "k", now=now))["day"] == 1000
    # a refund makes room again, and crossing 80% again in the same period alerts no more
    for r in [r for r in results if r.ok][:5]:
        await store.settle(SettleRequest(r.lease_id, charge_micro=0, now=now))
    more = await asyncio.gather(
        *[
            store.admit(
                AdmitRequest(_rid(), "k", "a", billing="credits", reserve_micro=100, key_daily_cap_micro=1000, now=now)
            )
            for _ in range(8)
        ]
    )
    assert sum(r.ok for r in more) == 5 and not [a for r in more for a in r.alerts]
    assert (await store.spent("key", "k", now=now))["day"] == 1000

    # account monthly cap: retry_after is the first of next month (new year here)
    m = await store.admit(
        AdmitRequest(_rid(), "k2", "a", billing="credits", reserve_micro=500, account_monthly_cap_micro=100, now=now)
    )
    assert m.code == "spend_limit_exceeded" and m.retry_after == seconds_to_month_end(now) == 43200
    assert m.cap_hit.scope == "account" and m.cap_hit.period == "month"


async def test_settle_extra_clamped_to_cap(store: CounterStore) -> None:
    now = time.time()
    await store.ensure_balance("a", 1_000_000)
    r = await store.admit(
        AdmitRequest(_rid(), "k", "a", billing="credits", reserve_micro=700, account_daily_cap_micro=1000, now=now)
    )
    s = await store.settle(SettleRequest(r.lease_id, charge_micro=5_000, now=now))
    assert s.charged_micro == 1000 and s.balance_after == 999_000
    assert (await store.spent("account", "a", now=now))["day"] == 1000


async def test_velocity_flag(store: CounterStore) -> None:
    now = time.time()
    await store.ensure_balance("a", 1_000_000)

    async def spend(charge: int, at: float):
        r = await store.admit(AdmitRequest(_rid(), "k", "a", billing="credits", reserve_micro=charge, now=at))
        return await store.settle(
            SettleRequest(r.lease_id, charge_micro=charge, velocity_window_s=60, velocity_max_micro=1000, now=at)
        )

    first = await spend(600, now)
    assert not first.velocity_exceeded and first.velocity_micro == 600
    second = await spend(600, now + 30)
    assert second.velocity_exceeded and second.velocity_micro == 1200
    # Over the limit: admission itself refuses the key until the gateway has suspended it in SQL
    # and lifts the mark (an answer may reach the client before that suspension is written).
    refused = await store.admit(AdmitRequest(_rid(), "k", "a", billing="credits", reserve_micro=1, now=now + 31))
    assert (refused.ok, refused.code) == (False, "api_key_suspended")
    assert (await store.admit(AdmitRequest(_rid(), "other-key", "a", now=now + 31))).ok
    await store.lift_velocity_stop("k")
    later = await spend(100, now + 75)  # the first charge left the window
    assert not later.velocity_exceeded and later.velocity_micro == 700


async def test_settle_reports_when_it_is_written_before_its_reply(store: CounterStore) -> None:
    admitted = await store.admit(AdmitRequest(_rid(), "k", "a", concurrency=1))
    sent = asyncio.get_running_loop().create_future()
    order: list[str] = []
    sent.add_done_callback(lambda _f: order.append("sent"))
    result = await store.settle(SettleRequest(admitted.lease_id), sent)
    order.append("reply")
    assert result.settled and order == ["sent", "reply"] and sent.result() is None
    assert (await store.admit(AdmitRequest(_rid(), "k", "a", concurrency=1))).ok  # the slot came back


@pytest.mark.parametrize("group_commit", [True, False])
async def test_a_settlement_that_cannot_be_sent_says_so(group_commit: bool) -> None:
    s = CounterStore.from_url(f"redis://127.0.0.1:{free_port()}/0", "x:", group_commit=group_commit)
    try:
        sent = asyncio.get_running_loop().create_future()
        with pytest.raises(ServiceUnavailable):
            await s.settle(SettleRequest(_rid()), sent)
        assert sent.done() and sent.exception() is not None
    finally:
        await s.aclose()


# ---------------------------------------------------------------------------------------------
# failed-auth throttle, invalidations


async def test_auth_failure_throttle_per_ip(store: CounterStore) -> None:
    now = _ts(2024, 5, 1, 10, 0, 20)
    hits = [await store.auth_failure("203.0.113.9", 3, now=now) for _ in range(5)]
    assert [b for b, _ in hits] == [False, False, False, True, True]
    assert hits[-1][1] == 40
    assert await store.auth_blocked("203.0.113.9", 3, now=now) == 40
    assert await store.auth_blocked("198.51.100.1", 3, now=now) is None
    assert await store.auth_failure("198.51.100.1", 3, now=now) == (False, 40)
    assert await store.auth_blocked("203.0.113.9", 3, now=now + 40) is None  # next window


async def test_invalidation_broadcast(gstore: CounterStore) -> None:
    got: list[tuple[str, str]] = []
    ready = asyncio.Event()

    async def on(kind: str, ident: str) -> None:
        got.append((kind, ident))
        ready.set()

    task = gstore.subscribe_invalidations(on)
    try:
        await asyncio.wait_for(ready.wait(), 5)
        assert got == [("*", "")]
        assert await gstore.publish_invalidation("key", "k-1") == 1
        for _ in range(100):
            if len(got) == 2:
                break
            await asyncio.sleep(0.02)
        assert got[1] == ("key", "k-1")
    finally:
        task.cancel()


# ---------------------------------------------------------------------------------------------
# operations: group commit, NOSCRIPT, fail closed


async def test_group_commit_one_pipeline(gstore: CounterStore) -> None:
    """Calls made in one event-loop turn leave in one write: on the way that connects first, then
    on the open connection, where a call made while nothing is in flight leaves at once (it has
    nothing to wait for) and the rest of its turn follows together."""
    writes: list[int] = []
    roundtrip, write_now = gstore._roundtrip, gstore._write_now

    async def counting(batch, on_sent=lambda: None):
        writes.append(len(batch))
        return await roundtrip(batch, on_sent)

    def counting_now(batch, handlers):
        written = write_now(batch, handlers)
        if written:
            writes.append(len(batch))
        return written

    gstore._roundtrip, gstore._write_now = counting, counting_now  # type: ignore[method-assign]
    results = await asyncio.gather(*[gstore.admit(AdmitRequest(_rid(), "k", "a", rpm=1000)) for _ in range(40)])
    assert all(r.ok for r in results) and writes == [40]
    await asyncio.gather(*[gstore.settle(SettleRequest(r.lease_id)) for r in results])
    assert writes == [40, 1, 39] and await gstore.inflight("k") == 0
    results = await asyncio.gather(*[gstore.admit(AdmitRequest(_rid(), "k", "a", rpm=1000)) for _ in range(40)])
    assert all(r.ok for r in results) and writes == [40, 1, 39, 1, 39]


async def test_noscript_recovery(store: CounterStore) -> None:
    assert (await store.admit(AdmitRequest(_rid(), "k", "a"))).ok
    await store.client.script_flush()
    results = await asyncio.gather(*[store.admit(AdmitRequest(_rid(), "k", "a")) for _ in range(3)])
    assert all(r.ok for r in results)
    await store.client.script_flush()
    assert (await store.settle(SettleRequest(results[0].lease_id))).settled
    await store.client.script_flush()
    blocked, retry_after = await store.auth_failure("192.0.2.1", 5)
    assert not blocked and retry_after >= 1


@pytest.mark.parametrize("group_commit", [True, False])
async def test_redis_down_fails_closed(group_commit: bool) -> None:
    s = CounterStore.from_url(f"redis://127.0.0.1:{free_port()}/0", "x:", group_commit=group_commit)
    try:
        for call in (
            s.admit(AdmitRequest(_rid(), "k", "a")),
            s.settle(SettleRequest(_rid())),
            s.get_balance("a"),
            s.auth_failure("192.0.2.1", 5),
        ):
            with pytest.raises(ServiceUnavailable) as info:
                await call
            assert info.value.code == "counter_store_unavailable" and info.value.status == 503
    finally:
        await s.aclose()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(now=st.floats(0, 7_000_000_000, allow_nan=False))
def test_lua_periods_match_python(redis_url: str, now: float) -> None:
    """The script's UTC calendar (day key, midnight, month end) agrees with billing.py."""

    async def run() -> None:
        s = CounterStore.from_url(redis_url, f"p{uuid.uuid4().hex[:10]}:")
        try:
            await s.ensure_balance("a", 10)
            m = await s.admit(
                AdmitRequest(_rid(), "k", "a", billing="credits", reserve_micro=1, account_monthly_cap_micro=0, now=now)
            )
            assert m.retry_after == seconds_to_month_end(now)
            d = await s.admit(
                AdmitRequest(_rid(), "k", "a", billing="credits", reserve_micro=1, key_daily_cap_micro=0, now=now)
            )
            assert d.retry_after == seconds_to_utc_midnight(now)
            assert (await s.admit(AdmitRequest(_rid(), "k", "a", tokens_estimate=7, now=now))).ok
            assert await s.quota_usage("a", now=now) == {"requests": 1, "tokens": 7}
        finally:
            await s.aclose()

    asyncio.run(run())


async def test_redis_restart_resubscribes_and_reloads_scripts() -> None:
    """Redis restarts (scripts gone, connections dropped): admissions work again and the
    invalidation subscriber reconnects, announcing a resync ("*") before new messages."""
    port, workdir = free_port(), Path(tempfile.mkdtemp(prefix="trex-test-restart-"))
    proc = start_redis(port, workdir)
    s = CounterStore.from_url(f"redis://127.0.0.1:{port}/0", "r:")
    got: list[tuple[str, str]] = []
    task = s.subscribe_invalidations(lambda kind, ident: got.append((kind, ident)), reconnect_delay_s=0.1)

    async def until(cond, timeout: float = 8.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, got
            await asyncio.sleep(0.02)

    try:
        await until(lambda: got == [("*", "")])
        assert (await s.admit(AdmitRequest(_rid(), "k", "a"))).ok
        proc.terminate()
        proc.wait(10)
        with pytest.raises(ServiceUnavailable):
            await s.admit(AdmitRequest(_rid(), "k", "a"))
        proc = start_redis(port, workdir)
        await until(lambda: got.count(("*", "")) >= 2)
        assert (await s.admit(AdmitRequest(_rid(), "k", "a"))).ok  # NOSCRIPT on the new server
        await s.publish_invalidation("account", "a-9")
        await until(lambda: ("account", "a-9") in got)
    finally:
        task.cancel()
        await s.aclose()
        proc.terminate()
        proc.wait(10)
