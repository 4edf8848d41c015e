"""Redis behind Sentinel (admission/redis_urls.py, lean_redis.py, redis_durability.py) on a real primary,
two replicas and three sentinels on loopback (local/sentinel_set.py), the primary SIGKILLed while
admissions and settlements run:

- every connection follows the failover without a restart, the lean hot-path one included, and
  while no primary is known calls fail promptly with 503 ``counter_store_unavailable`` (never hang);
- with durable writes (WAIT 1), a charge answered before the failover survives it even when the
  last half-second of the old primary's writes never reached a replica: every answered request's
  charge is in the ledger stream exactly once, and the ledger equals the balance;
- without them, the same run loses answered charges (the check above can fail);
- with a single replica, the promoted one has no replica left to acknowledge: durable admissions
  are refused (fail closed) until one joins."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import pytest
import redis

from trex_serve.admission.counters import AdmitRequest, CounterStore, SettleRequest
from trex_serve.admission.redis_urls import sync_client
from trex_serve.errors import ServiceUnavailable
from trex_serve.local.sentinel_set import SentinelSet
from trex_serve.redis_durability import Durability

INITIAL = 10**12
CHARGE = 900
LEASE_S = 3.0  # short, so the leases of refused admissions are reaped within the test
KEYS = 4


@pytest.fixture
def sentinels(tmp_path):
    sset = SentinelSet(tmp_path / "redis").start()
    yield sset
    sset.stop()


@pytest.fixture
def one_replica(tmp_path):
    sset = SentinelSet(tmp_path / "redis", replicas=1).start()
    yield sset
    sset.stop()


@dataclass
class Run:
    answered: list[str] = field(default_factory=list)  # admitted and settled: the client got a 200
    refused: Counter = field(default_factory=Counter)  # 503s: (code, the Redis error behind it)
    slowest_s: float = 0.0


async def _load(store: CounterStore, stop: asyncio.Event, run: Run, workers: int = 16) -> None:
    """Admission then settlement per request, as the gateway does, until ``stop``."""

    async def worker(w: int) -> None:
        while not stop.is_set():
            rid = uuid.uuid4().hex
            t0 = time.monotonic()
            try:
                res = await store.admit(AdmitRequest(rid, f"key{w % KEYS}", "acct", billing="credits",
                                                     reserve_micro=1500, concurrency=1000, lease_ttl_s=LEASE_S))
                assert res.ok, res
                settled = await store.settle(SettleRequest(rid, tokens_in=300, tokens_out=100,
                                                           charge_micro=CHARGE))
                assert settled.charged_micro == CHARGE, settled
                run.answered.append(rid)
            except ServiceUnavailable as exc:
                run.refused[(exc.code, str(exc).split(":")[1].strip())] += 1
                await asyncio.sleep(0.02)
            run.slowest_s = max(run.slowest_s, time.monotonic() - t0)

    await asyncio.gather(*(worker(w) for w in range(workers)))


async def _failover_under_load(sset: SentinelSet, store: CounterStore, cut: bool) -> tuple[Run, float]:
    """Load; optionally cut replication; 0.5 s later SIGKILL the primary; load on until requests
    are answered again after the promotion. Returns the run and the seconds the promotion took."""
    await store.ensure_balance("acct", INITIAL)
    run, stop = Run(), asyncio.Event()
    load = asyncio.ensure_future(_load(store, stop, run))
    await asyncio.sleep(1.0)
    assert run.answered, "nothing answered before the fault"
    if cut:
        sset.cut_replication()
    await asyncio.sleep(0.5)
    old = await asyncio.to_thread(sset.kill_primary)
    _, took = await asyncio.to_thread(sset.wait_failover, old)
    served_before = len(run.answered)
    deadline = time.monotonic() + 15  # serving again without a restart (a replica reattaching first)
    while len(run.answered) < served_before + 50 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    stop.set()
    await load
    assert len(run.answered) > served_before, "nothing answered after the promotion"
    return run, took


async def _reap(store: CounterStore, sset: SentinelSet) -> None:
    """Admissions a replica acknowledged too late were refused (503) but hold their reservation
    on the new primary until their lease expires: let it, and let each key's next admission reap
    them (settled as failed: the reservation comes back, nothing is charged). An admission reaps
    at most 32 expired leases, and a failover can leave more on one key (calls executed whose
    reply the lost connection never delivered): admit again until none is left on the primary the
    sentinels name now. That may not be the one promoted first: on a busy machine the sentinels
    sometimes depose it a second later and promote the other replica, while it still answers as a
    primary (docs/RELIABILITY.md, section 8); the store follows them within its recheck (1 s).
    The sentinels themselves make the deposed one a replica only ~10 s later: a longer deadline
    would hide a store that stays on it until then."""
    await asyncio.sleep(LEASE_S + 0.5)
    for k in range(KEYS):
        deadline = time.monotonic() + 3
        while True:
            rid = uuid.uuid4().hex
            assert (await store.admit(AdmitRequest(rid, f"key{k}", "acct", billing="credits"))).ok
            await store.settle(SettleRequest(rid, success=False))
            if not redis.Redis(port=sset.primary()).zcard(store._k("lease", f"key{k}")):
                break
            assert time.monotonic() < deadline, f"key{k}'s expired leases are still held on the primary"
            await asyncio.sleep(0.02)


def _ledger(sset: SentinelSet, prefix: str) -> tuple[Counter, int, int]:
    """(charges per request id in the ledger stream, balance, unbooked) on the current primary."""
    client = redis.Redis(port=sset.primary(), decode_responses=True)
    entries = client.xrange(f"{prefix}stream:ledger")
    charges = Counter(fields["r"] for _, fields in entries)
    assert all(int(fields["amt"]) == CHARGE for _, fields in entries)
    return charges, int(client.get(f"{prefix}bal:acct")), int(client.get(f"{prefix}unbooked:acct") or 0)


async def test_every_connection_follows_a_failover_and_fails_closed_meanwhile(sentinels):
    prefix = f"f{uuid.uuid4().hex[:8]}:"
    store = CounterStore.from_url(sentinels.url(), prefix)
    assert store._lean is not None and store._lean.resolve is not None, "the hot path keeps its lean connection"
    sync = sync_client(sentinels.url(), socket_timeout=1)
    try:
        run, took = await _failover_under_load(sentinels, store, cut=False)
        assert {code for code, _ in run.refused} <= {"counter_store_unavailable"}, run.refused
        # Bounded by the store's own deadline: a call waits for no failover to finish.
        assert run.slowest_s < store.timeout_s + 1, f"a call hung for {run.slowest_s:.1f} s"
        # redis-py's pooled connections (balances, drainers, pub/sub) and the blocking client too.
        assert await store.get_balance("acct") is not None
        assert sync.set(f"{prefix}sync", "1") and sentinels.primary() == sync.connection_pool.get_master_address()[1]
        print(f"promotion took {took:.2f} s; {len(run.answered)} answered, refused {dict(run.refused)}")
    finally:
        await store.aclose()
        sync.close()


async def test_durable_settlements_survive_a_failover_whose_last_writes_never_replicated(sentinels):
    prefix = f"d{uuid.uuid4().hex[:8]}:"
    store = CounterStore.from_url(sentinels.url(), prefix, durability=Durability(1, timeout_ms=100))
    try:
        run, took = await _failover_under_load(sentinels, store, cut=True)
        await _reap(store, sentinels)
    finally:
        await store.aclose()
    charges, balance, unbooked = _ledger(sentinels, prefix)
    uncharged = [rid for rid in run.answered if rid not in charges]
    assert not uncharged, f"{len(uncharged)} of {len(run.answered)} answered requests lost their charge"
    assert max(charges.values()) == 1, "a request charged twice"
    assert set(charges) == set(run.answered), "a charge without an answer"
    assert INITIAL - balance == sum(charges.values()) * CHARGE == unbooked, "ledger != balance"
    print(f"durable: promotion {took:.2f} s, {len(run.answered)} answered and charged once, "
          f"refused {dict(run.refused)}, slowest {run.slowest_s:.2f} s")


async def test_without_durable_writes_the_same_failover_loses_answered_charges(sentinels):
    prefix = f"n{uuid.uuid4().hex[:8]}:"
    store = CounterStore.from_url(sentinels.url(), prefix)
    try:
        run, _ = await _failover_under_load(sentinels, store, cut=True)
        await _reap(store, sentinels)
    finally:
        await store.aclose()
    charges, balance, _ = _ledger(sentinels, prefix)
    lost = [rid for rid in run.answered if rid not in charges]
    assert lost, "the cut replication lost nothing: the durable test above would prove nothing"
    # Charges are lost, but no reservation stays held: every one is reaped on the primary.
    held = INITIAL - balance - sum(charges.values()) * CHARGE
    assert not held, f"{held} micro-credits of reservations stayed held after the failover"
    print(f"not durable: {len(lost)} of {len(run.answered)} answered requests lost their charge")


async def test_with_one_replica_durable_admissions_wait_for_a_replica_after_the_failover(one_replica):
    prefix = f"o{uuid.uuid4().hex[:8]}:"
    store = CounterStore.from_url(one_replica.url(), prefix, durability=Durability(1, timeout_ms=50))
    request = AdmitRequest("x", "key", "acct", billing="quota")
    try:
        assert (await store.admit(request)).ok
        old = one_replica.kill_primary()
        new, _ = one_replica.wait_failover(old)
        assert one_replica.connected_replicas(new) == 0
        # Every admission fails closed: first while the sentinels settle on the new primary, then
        # because nothing can acknowledge its writes.
        refusals: list[str] = []
        deadline = time.monotonic() + 15
        while sum("acknowledged by 0 of the 1" in r for r in refusals) < 3 and time.monotonic() < deadline:
            with pytest.raises(ServiceUnavailable) as caught:
                await store.admit(AdmitRequest(f"after{len(refusals)}", "key", "acct", billing="quota"))
            refusals.append(str(caught.value))
            await asyncio.sleep(0.1)
        assert sum("acknowledged by 0 of the 1" in r for r in refusals) >= 3, refusals
    finally:
        await store.aclose()


async def test_a_durable_settlement_is_sent_only_once_replicas_hold_it(sentinels):
    """``sent`` releases the answer (pipeline/settle_and_answer.py): while no replica can acknowledge, it waits; the
    settlement is sent again on the promoted replica and the charge lands there once."""
    prefix = f"s{uuid.uuid4().hex[:8]}:"
    store = CounterStore.from_url(sentinels.url(), prefix, durability=Durability(1, timeout_ms=100))
    try:
        await store.ensure_balance("acct", INITIAL)
        assert (await store.admit(AdmitRequest("r1", "key", "acct", billing="credits", reserve_micro=1500))).ok
        sentinels.cut_replication()
        sent = asyncio.get_running_loop().create_future()
        settling = asyncio.ensure_future(store.settle(SettleRequest("r1", charge_micro=CHARGE), sent))
        await asyncio.sleep(0.5)
        assert not sent.done(), "the answer would have left before any replica held its charge"
        old = await asyncio.to_thread(sentinels.kill_primary)
        await asyncio.to_thread(sentinels.wait_failover, old)
        result = await asyncio.wait_for(settling, 15)
        assert sent.done() and sent.exception() is None and result.charged_micro == CHARGE
    finally:
        await store.aclose()
    charges, balance, _ = _ledger(sentinels, prefix)
    assert charges == Counter({"r1": 1}) and INITIAL - balance == CHARGE


async def test_past_its_deadline_a_settlement_the_primary_holds_stands_and_a_refused_admission_gives_back(sentinels):
    """No replica acknowledges (replication cut, no failover: a second failover's new primary left
    without replicas looks the same). A settlement the primary holds stands once its deadline
    passes: refusing that request would charge a client for an answer it never got. An admission
    the primary made but no replica acknowledged is refused, and its lease and reservation come
    back at once, not when the lease expires minutes later."""
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    store = CounterStore.from_url(sentinels.url(), prefix,
                                  durability=Durability(1, timeout_ms=100, settle_deadline_s=0.6))
    lease_key = store._k("lease", "key")
    try:
        await store.ensure_balance("acct", INITIAL)
        admit = AdmitRequest("r1", "key", "acct", billing="credits", reserve_micro=1500, lease_ttl_s=300)
        assert (await store.admit(admit)).ok
        sentinels.cut_replication()
        settled = await store.settle(SettleRequest("r1", charge_micro=CHARGE))
        assert settled.charged_micro == CHARGE
        primary = redis.Redis(port=sentinels.primary())
        calls_before = primary.info("commandstats")["cmdstat_evalsha"]["calls"]
        with pytest.raises(ServiceUnavailable, match="acknowledged by 0 of the 1"):
            await store.admit(AdmitRequest("r2", "key", "acct", billing="credits", reserve_micro=1500,
                                           lease_ttl_s=300))
        deadline = time.monotonic() + 5
        while primary.zcard(lease_key) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not primary.zcard(lease_key), "the refused admission's lease is still held"
        # Given back once: not sent again and again for as long as no replica acknowledges.
        await asyncio.sleep(1.0)
        calls = primary.info("commandstats")["cmdstat_evalsha"]["calls"] - calls_before
        assert calls == 2, f"{calls} script calls for one refused admission and its give-back"
    finally:
        await store.aclose()
    charges, balance, unbooked = _ledger(sentinels, prefix)
    assert charges == Counter({"r1": 1}) and INITIAL - balance == CHARGE == unbooked
