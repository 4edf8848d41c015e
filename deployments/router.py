"""The Router deployment: owns health scores and circuit states per provider×model. Pools report
outcomes to it in batches; ingress replicas poll its table. Never called once per request."""

from __future__ import annotations

from ray import serve

from trex_serve.health import HealthPolicy, HealthTracker, Outcome
from trex_serve.routing import RoutingTable


@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class Router:
    def __init__(self, policy: dict | None = None) -> None:
        self.tracker = HealthTracker(HealthPolicy(**(policy or {})))
        self.version = 0

    async def report(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            self.tracker.record(outcome)
        self.version += 1

    async def table(self) -> RoutingTable:
        # Circuits move from open to half-open with time alone, so every poll re-reads the state.
        self.version += 1
        return RoutingTable(self.tracker.snapshot(), self.version)
