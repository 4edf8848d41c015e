"""Circuit breakers, probes and the way a recovery reaches the routing (trex_serve.routing.health,
trex_serve.routing.resolve.Planner, trex_serve.routing.health_board), driven by a fake clock: no sleeps."""

from __future__ import annotations

import asyncio

import pytest

from trex_serve.catalog import Candidate, Catalog, Model, Provider
from trex_serve.errors import UpstreamUnavailable
from trex_serve.routing.health import HealthPolicy, HealthTracker, Outcome, OutcomeBatch
from trex_serve.routing.health_board import HealthBoard
from trex_serve.routing.resolve import Planner, RoutingTable, resolve

A, B = ("alpha", "alpha-mini"), ("beta", "beta-mini")
T0 = 1_000_000.0


def catalog() -> Catalog:
    return Catalog(
        providers=[Provider(name="alpha", base_url="http://a/v1"), Provider(name="beta", base_url="http://b/v1")],
        models=[Model(id="m", candidates=[Candidate(provider="alpha", model="alpha-mini"),
                                          Candidate(provider="beta", model="beta-mini")])])


RES = resolve(catalog(), "m", None)


def fail(key, at, retry_after=None) -> Outcome:
    return Outcome(key[0], key[1], False, 10.0, 503, retry_after, at)


def ok(key, at) -> Outcome:
    return Outcome(key[0], key[1], True, 10.0, 200, None, at)


def open_long(tracker: HealthTracker, key, at: float, rounds: int = 5) -> float:
    """Open ``key`` and fail its probes until the cool-down is long; returns the time reached."""
    for i in range(tracker.policy.failure_threshold):
        tracker.record(fail(key, at + i * 0.01))
    for _ in range(rounds):
        at = tracker.health(*key, now=at).open_until + 0.01
        tracker.record(fail(key, at))
    return at


def planner_with(tracker: HealthTracker, now: float, version: int = 1) -> Planner:
    planner = Planner(tracker.policy)
    planner.update(RoutingTable(tracker.snapshot(now), version, "epoch"))
    return planner


def names(targets) -> list[str]:
    return [t.provider for t in targets]


# ---- the tracker ------------------------------------------------------------------------------


def test_cooldown_doubles_per_failed_probe_up_to_the_cap():
    tracker = HealthTracker()
    at = open_long(tracker, A, T0, rounds=6)
    h = tracker.health(*A, now=at)
    assert h.state == "open" and h.open_until - at == pytest.approx(300.0)


def test_record_says_when_the_circuit_changed():
    tracker = HealthTracker()
    changes = [tracker.record(fail(A, T0 + i)) for i in range(5)]
    assert changes == [False, False, False, False, True]
    assert tracker.health(*A, now=T0 + 5).changed_at == T0 + 4
    assert tracker.record(fail(A, T0 + 5)) is False  # already open: nothing new
    assert tracker.record(ok(A, T0 + 6)) is True
    h = tracker.health(*A, now=T0 + 6)
    assert h.state == "closed" and h.changed_at == T0 + 6


def test_a_failure_after_the_cooldown_is_a_failed_probe_even_unread():
    """Nobody read the state between the cool-down's end and the failure: it still doubles."""
    tracker = HealthTracker()
    for i in range(5):
        tracker.record(fail(A, T0 + i * 0.01))
    first = tracker.health(*A, now=T0).open_until
    assert tracker.record(fail(A, first + 1)) is True
    assert tracker.health(*A, now=first + 1).open_until == pytest.approx(first + 1 + 20.0)


def test_upstream_retry_after_holds_the_target():
    tracker = HealthTracker()
    tracker.record(fail(A, T0, retry_after=30))
    h = tracker.health(*A, now=T0)
    assert h.state == "open" and h.hold_until == T0 + 30
    tracker.record(ok(A, T0 + 31))
    assert tracker.health(*A, now=T0 + 31).hold_until == 0.0


# ---- the planner: probes ----------------------------------------------------------------------


def test_open_target_keeps_its_cooldown_while_another_candidate_is_healthy():
    tracker = HealthTracker()
    at = open_long(tracker, A, T0)
    planner = planner_with(tracker, at)
    until = tracker.health(*A, now=at).open_until
    now = at
    while now < until - 1:
        assert names(planner.order(RES, now=now)) == ["beta"]
        now += 0.1


def test_every_candidate_open_probes_each_at_a_bounded_rate():
    tracker = HealthTracker()
    at = max(open_long(tracker, A, T0), open_long(tracker, B, T0))
    planner = planner_with(tracker, at)
    assert min(tracker.health(*k, now=at).open_until for k in (A, B)) - at > 100  # long cool-downs
    probes = {"alpha": 0, "beta": 0}
    refused = 0
    for i in range(600):  # 60 s of requests every 0.1 s, all still failing
        try:
            for target in planner.order(RES, now=at + i * 0.1):
                probes[target.provider] += 1
                planner.observe(target.key, False, now=at + i * 0.1)
        except UpstreamUnavailable as exc:
            refused += 1
            assert exc.status == 503 and exc.response_headers()["Retry-After"] == "1"
    # One probe per target per panic interval, not one per request and not none.
    per_target = round(60 / planner.panic_probe_interval_s)
    assert probes == {"alpha": per_target, "beta": per_target}
    assert refused == 600 - per_target


def test_a_provider_retry_after_holds_off_even_panic_probes():
    tracker = HealthTracker()
    open_long(tracker, B, T0)
    tracker.record(fail(A, T0, retry_after=30))
    planner = planner_with(tracker, T0 + 1)
    seen = []
    for i in range(400):
        now = T0 + 1 + i * 0.1
        try:
            seen += [(round(now - T0, 1), t.provider) for t in planner.order(RES, now=now)]
        except UpstreamUnavailable:
            pass
    assert min(at for at, p in seen if p == "alpha") >= 30
    with pytest.raises(UpstreamUnavailable) as err:
        planner_with(tracker, T0 + 1).order(resolve(catalog(), "alpha/alpha-mini", None), now=T0 + 1)
    assert err.value.response_headers()["Retry-After"] == "29"


# ---- the planner: a recovery -------------------------------------------------------------------


def test_a_successful_probe_is_used_at_once_by_its_replica():
    tracker = HealthTracker()
    at = max(open_long(tracker, A, T0), open_long(tracker, B, T0))
    planner = planner_with(tracker, at)
    [probe_a, probe_b] = planner.order(RES, now=at)
    planner.observe(probe_a.key, True, now=at)
    # The table still says open (the report is on its way), yet every request goes to alpha now.
    for i in range(1, 30):
        assert names(planner.order(RES, now=at + i * 0.1))[-1] == "alpha"


def test_local_recovery_yields_to_the_table():
    tracker = HealthTracker()
    at = open_long(tracker, A, T0)
    planner = planner_with(tracker, at)
    planner.observe(A, True, now=at)
    assert planner.health(A, now=at).state == "closed"
    # The Router later saw alpha fail again after our success: its word wins.
    for i in range(5):
        tracker.record(fail(A, at + 0.5 + i * 0.01))
    tracker.record(fail(A, tracker.health(*A, now=at + 1).open_until + 1))
    later = tracker.health(*A, now=at + 1).open_until - 1
    planner.update(RoutingTable(tracker.snapshot(later), 2, "epoch"))
    assert planner.health(A, now=later).state == "open"


def test_local_recovery_ends_on_a_failure_or_after_the_hold():
    tracker = HealthTracker()
    at = open_long(tracker, A, T0)
    planner = planner_with(tracker, at)
    planner.observe(A, True, now=at)
    planner.observe(A, False, now=at + 0.1)
    assert planner.health(A, now=at + 0.2).state == "open"
    planner.observe(A, True, now=at + 1)
    assert planner.health(A, now=at + 1 + planner.recovered_hold_s - 0.1).state == "closed"
    assert planner.health(A, now=at + 1 + planner.recovered_hold_s + 0.1).state == "open"


def test_a_restarted_router_is_believed_though_its_version_is_lower():
    planner = Planner()
    planner.update(RoutingTable({}, 10_000, "old"))
    planner.update(RoutingTable({A: HealthTracker().health(*A, now=T0)}, 1, "new"))
    assert planner.table.epoch == "new"
    planner.update(RoutingTable({}, 0, "new"))
    assert planner.table.version == 1


def test_outage_then_recovery_two_replicas_simulated():
    """Both providers down 45 s under 10 req/s spread over two ingress replicas, then both back.
    Pools report every 0.25 s (at once when a target answers again); tables reach the replicas as
    soon as a circuit changes, else every 0.25 s."""
    policy = HealthPolicy()
    board_tracker = HealthTracker(policy)
    replicas = [Planner(policy), Planner(policy)]
    heal_at = T0 + 45.0
    pending: list[tuple[float, Outcome]] = []  # (delivered at, outcome)
    version = 0
    calls = {"alpha": 0, "beta": 0}
    down_calls = {"alpha": 0, "beta": 0}
    answers: list[tuple[float, int]] = []
    next_poll = T0
    for i in range(int(60 / 0.1)):
        now = T0 + i * 0.1
        due = [o for at, o in pending if at <= now]
        pending = [(at, o) for at, o in pending if at > now]
        changed = any([board_tracker.record(o) for o in due])
        if changed or now >= next_poll:
            version += 1
            for r in replicas:
                r.update(RoutingTable(board_tracker.snapshot(now), version, "epoch"))
            next_poll = now + 0.25
        planner = replicas[i % 2]
        status = 503
        try:
            for target in planner.order(RES, now=now):
                calls[target.provider] += 1
                up = now >= heal_at
                if not up:
                    down_calls[target.provider] += 1
                planner.observe(target.key, up, now=now)
                outcome = (ok if up else fail)(target.key, now)
                pending.append((now + (0.01 if up else 0.25), outcome))
                if up:
                    status = 200
                    break
                status = 502
        except UpstreamUnavailable:
            pass
        answers.append((now, status))
    first_ok = min(at for at, s in answers if s == 200)
    assert first_ok - heal_at <= policy.panic_probe_interval_s  # the old code: ~25 s
    assert all(s == 200 for at, s in answers if at >= first_ok)
    # During the 45 s outage a provider saw at most one call per panic interval per replica, plus
    # the requests before its circuit opened.
    for provider in ("alpha", "beta"):
        assert 45 / policy.panic_probe_interval_s <= down_calls[provider]
        assert down_calls[provider] <= 45 / policy.panic_probe_interval_s * 2 + 10


# ---- the Router's side -------------------------------------------------------------------------


def test_outcome_batch_is_urgent_when_a_failing_target_answers():
    batch = OutcomeBatch()
    assert batch.add(ok(A, T0)) is False
    assert batch.add(fail(A, T0)) is False
    assert batch.add(fail(B, T0)) is False
    assert batch.add(ok(A, T0)) is True
    assert batch.add(ok(A, T0)) is False
    assert len(batch.take()) == 5 and batch.take() == []


async def test_board_answers_a_waiting_replica_when_a_circuit_changes():
    board = HealthBoard(clock=lambda: T0)
    first = await board.table()
    waiting = asyncio.create_task(board.table(first.changes, wait_s=60))
    board.report([ok(A, T0)])  # changes nothing: the fetch keeps waiting
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done()
    board.report([fail(A, T0 + i * 0.01) for i in range(5)])  # opens alpha
    table = await asyncio.wait_for(waiting, 5)
    assert table.health[A].state == "open" and table.changes == first.changes + 1
    assert table.epoch == first.epoch and table.version > first.version


async def test_board_answers_at_once_when_the_replica_is_behind():
    board = HealthBoard(clock=lambda: T0)
    board.report([fail(A, T0 + i * 0.01) for i in range(5)])
    table = await asyncio.wait_for(board.table(0, wait_s=60), 5)
    assert table.changes == 1
