"""Health scores and circuit breakers per provider×model. Pure logic: the Router deployment owns one
tracker, tests drive it directly."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

CircuitState = Literal["closed", "open", "half_open"]


@dataclass(frozen=True)
class Outcome:
    provider: str
    model: str
    ok: bool
    latency_ms: float = 0.0
    status: int = 200
    retry_after: float | None = None
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class TargetHealth:
    state: CircuitState
    score: float
    open_until: float = 0.0
    error_rate: float = 0.0
    latency_ms: float = 0.0


@dataclass
class _Target:
    window: deque = field(default_factory=lambda: deque(maxlen=50))
    latency_ewma: float = 0.0
    consecutive_failures: int = 0
    state: CircuitState = "closed"
    open_until: float = 0.0
    opened_count: int = 0


@dataclass(frozen=True)
class HealthPolicy:
    failure_threshold: int = 5  # consecutive failures that open the circuit
    error_rate_threshold: float = 0.5
    min_window: int = 10
    window_s: float = 60.0
    cooldown_s: float = 10.0
    max_cooldown_s: float = 300.0


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

    def record(self, outcome: Outcome) -> None:
        p = self.policy
        t = self._get(outcome.provider, outcome.model)
        t.window.append((outcome.at, outcome.ok, outcome.status == 429))
        if outcome.latency_ms > 0:
            t.latency_ewma = outcome.latency_ms if t.latency_ewma == 0 else (
                0.8 * t.latency_ewma + 0.2 * outcome.latency_ms
            )
        if outcome.ok:
            t.consecutive_failures = 0
            if t.state != "closed":
                t.state, t.open_until, t.opened_count = "closed", 0.0, 0
            return
        t.consecutive_failures += 1
        now = outcome.at
        if outcome.retry_after:
            # The upstream told us when to come back: that is the cool-down.
            self._open(t, now, min(float(outcome.retry_after), p.max_cooldown_s))
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
        return TargetHealth(t.state, round(score, 4), t.open_until, round(err, 4), round(t.latency_ewma, 2))

    def snapshot(self, now: float | None = None) -> dict[tuple[str, str], TargetHealth]:
        now = time.time() if now is None else now
        return {key: self.health(*key, now=now) for key in list(self._targets)}
