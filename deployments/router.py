"""The Router deployment: owns health scores and circuit states per provider×model. Pools report
outcomes to it in batches; ingress replicas fetch its table in a loop that returns early when a
circuit changes (trex_serve.routing.health_board). Never called once per request."""

from __future__ import annotations

from ray import serve

from trex_serve.routing.health import HealthPolicy, Outcome
from trex_serve.routing.health_board import HealthBoard
from trex_serve.routing.resolve import RoutingTable


@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class Router:
    def __init__(self, policy: dict | None = None) -> None:
        self.board = HealthBoard(HealthPolicy(**(policy or {})))

    async def report(self, outcomes: list[Outcome]) -> None:
        self.board.report(outcomes)

    async def table(self, seen: int | None = None, wait_s: float = 0.0) -> RoutingTable:
        return await self.board.table(seen, wait_s)
