"""Health scores and circuit breakers per provider×model. Pure logic: the Router deployment owns one
tracker, tests drive it directly."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from trex_serve.hop.contract import Outcome

CircuitState = Literal["closed", "open", "half_open"]


@dataclass(frozen=True)
class TargetHealth:
    state: CircuitState
    score: float
    open_until: float = 0.0
    error_rate: float = 0.0
    latency_ms: float = 0.0
    hold_until: float = 0.0  # until when the upstream's own Retry-After asked us to stay away
    changed_at: float = 0.0  # when the circuit last opened or closed (the outcome's time)


@dataclass
class _Target:
    window: deque = field(default_factory=lambda: deque(maxlen=50))
    latency_ewma: float = 0.0
    consecutive_failures: int = 0
    state: CircuitState = "closed"
    open_until: float = 0.0
    hold_until: float = 0.0
    changed_at: float = 0.0
    opened_count: int = 0


@dataclass(frozen=True)
class HealthPolicy:
    failure_threshold: int = 5  # consecutive failures that open the circuit
    error_rate_threshold: float = 0.5
    min_window: int = 10
    window_s: float = 60.0
    cooldown_s: float = 10.0
    max_cooldown_s: float = 300.0
    # Read by each ingress replica's Planner (trex_serve.routing.resolve), not by the tracker:
    probe_interval_s: float = 1.0  # one probe per half-open target per replica, while others serve
    panic_probe_interval_s: float = 1.0  # one probe per target per replica when no candidate is usable
    recovered_hold_s: float = 5.0  # a replica trusts its own successful probe this long before the Router's word


class HealthTracker:
    def __init__(self, policy: HealthPolicy | None = None) -> None:
        self.policy = policy or HealthPolicy()
        self._targets: dict[tuple[str, str], _Target] = {}

    def _get(self, provider: str, model: str) -> _Target:
        key = (provider, model)
        target = self._targets.get(key)
        if target is None:
            target = self._targets[key] = _Target()
        return target

    def record(self, outcome: Outcome) -> bool:
        """Count one outcome; True when it opened or closed the circuit."""
        p = self.policy
        t = self._get(outcome.provider, outcome.model)
        before = (t.state, t.open_until)
        self._record(t, outcome, p)
        if (t.state, t.open_until) == before:
            return False
        t.changed_at = outcome.at
        return True

    def _record(self, t: _Target, outcome: Outcome, p: HealthPolicy) -> None:
        t.window.append((outcome.at, outcome.ok, outcome.status == 429))
        if outcome.latency_ms > 0:
            t.latency_ewma = outcome.latency_ms if t.latency_ewma == 0 else (
                0.8 * t.latency_ewma + 0.2 * outcome.latency_ms
            )
        if outcome.ok:
            t.consecutive_failures = 0
            if t.state != "closed":
                t.state, t.open_until, t.hold_until, t.opened_count = "closed", 0.0, 0.0, 0
            return
        t.consecutive_failures += 1
        now = outcome.at
        if t.state == "open" and now >= t.open_until:
            t.state = "half_open"  # the cool-down is over: this failure is a failed probe
        if outcome.retry_after:
            # The upstream told us when to come back: that is the cool-down, and even a model with
            # no other candidate does not probe before it.
            cooldown = min(float(outcome.retry_after), p.max_cooldown_s)
            t.hold_until = max(t.hold_until, now + cooldown)
            self._open(t, now, cooldown)
            return
        if t.state == "half_open":
            self._open(t, now, None)
            return
        if t.state == "open":
            return
        recent = [w for w in t.window if w[0] >= now - p.window_s]
        failures = sum(1 for w in recent if not w[1])
        if t.consecutive_failures >= p.failure_threshold or (
            len(recent) >= p.min_window and failures / len(recent) >= p.error_rate_threshold
        ):
            self._open(t, now, None)

    def _open(self, t: _Target, now: float, cooldown: float | None) -> None:
        if cooldown is None:
            # Back off longer each time a probe fails, up to the cap.
            cooldown = min(self.policy.cooldown_s * (2 ** min(t.opened_count, 5)), self.policy.max_cooldown_s)
        t.state = "open"
        t.open_until = max(t.open_until, now + cooldown)
        t.opened_count += 1

    def health(self, provider: str, model: str, now: float | None = None) -> TargetHealth:
        now = time.time() if now is None else now
        t = self._targets.get((provider, model))
        if t is None:
            return TargetHealth("closed", 1.0)
        if t.state == "open" and now >= t.open_until:
            t.state = "half_open"
        recent = [w for w in t.window if w[0] >= now - self.policy.window_s]
        n = len(recent)
        err = sum(1 for w in recent if not w[1]) / n if n else 0.0
        throttled = sum(1 for w in recent if w[2]) / n if n else 0.0
        latency_factor = 1.0 / (1.0 + t.latency_ewma / 2000.0)
        score = max(0.0, (1.0 - err) * (1.0 - 0.5 * throttled) * latency_factor)
        if t.state == "open":
            score = 0.0
        return TargetHealth(t.state, round(score, 4), t.open_until, round(err, 4), round(t.latency_ewma, 2),
                            t.hold_until, t.changed_at)

    def snapshot(self, now: float | None = None) -> dict[tuple[str, str], TargetHealth]:
        now = time.time() if now is None else now
        return {key: self.health(*key, now=now) for key in list(self._targets)}


class OutcomeBatch:
    """The outcomes a pool replica gathers between two reports to the Router. A provider×model that
    answers again after failing is news every ingress replica is waiting for (its model may be dark):
    ``add`` says when the batch should go at once instead of with the next report."""

    def __init__(self) -> None:
        self.pending: list[Outcome] = []
        self._failing: dict[tuple[str, str], bool] = {}

    def add(self, outcome: Outcome) -> bool:
        self.pending.append(outcome)
        key = (outcome.provider, outcome.model)
        urgent = outcome.ok and self._failing.get(key, False)
        self._failing[key] = not outcome.ok
        return urgent

    def take(self) -> list[Outcome]:
        batch, self.pending = self.pending, []
        return batch
