"""The Ingress deployment: the FastAPI app of trex_serve.web.http_app, wired to Ray. Each request makes
one hop per attempt: a ProviderPool replica is picked from the ingress's local view of the pool
(pool_view.py, kept fresh from Serve's router), and the request is relayed over HTTP to that
replica's own port (ARCHITECTURE.md)."""

from __future__ import annotations

import asyncio
import logging

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.logs import route_core_logs
from deployments.pool_view import PoolView
from trex_serve import replica_state
from trex_serve.hop.relay import HttpRelay
from trex_serve.observability import stage_probe
from trex_serve.pipeline import Pipeline
from trex_serve.routing.health import HealthPolicy
from trex_serve.routing.resolve import Planner
from trex_serve.runtime import Runtime
from trex_serve.web.http_app import build_http_app

log = logging.getLogger("trex.ingress")

http_app = build_http_app(replica_state.pipeline, replica_state.admin_app)


@serve.deployment(max_ongoing_requests=100000, ray_actor_options={"num_cpus": 0})
@serve.ingress(http_app)
class Ingress:
    async def __init__(self, args: dict, pools: dict[str, DeploymentHandle], router: DeploymentHandle) -> None:
        route_core_logs()
        stage_probe.install_ingress()  # stage timers for scripts/bench_stages.py; off unless TREX_STAGE_PROBE
        self.pools = pools
        self.router = router
        self.runtime = await Runtime.create(args)
        self.planner = Planner(HealthPolicy(**self.runtime.catalog.health.model_dump()))
        # Pool replicas are chosen from a local view of them, not by asking Serve per request (pool_view.py).
        self.pool_view = PoolView(pools)
        self.pool_view.start()
        self.relay = HttpRelay(self.pool_view.pick, args["pool_secret"], tracker=self.pool_view)
        pipeline = Pipeline(self.runtime.catalog, self.runtime.settings, self.runtime.gate,
                            self.runtime.keyed(self.relay),
                            self.planner, self.runtime.record)
        self.runtime.planner = self.planner
        replica_state.publish(pipeline, self.runtime.admin_app())
        self._poller = asyncio.create_task(self._poll_routing_table(float(args.get("table_poll_s", 0.25))))

    async def _poll_routing_table(self, interval: float) -> None:
        """The Router answers at once when a circuit changed since the table this replica holds,
        else after ``interval``: changes arrive as they happen, and an idle loop is a slow poll."""
        while True:
            table = self.planner.table
            try:
                self.planner.update(await self.router.table.remote(table.changes if table.epoch else None,
                                                                   interval))
            except Exception:
                log.warning("routing table poll failed", exc_info=True)
                await asyncio.sleep(interval)
            else:
                await asyncio.sleep(0.01)  # a floor, should circuits flap faster than that

    async def check_health(self) -> None:
        await asyncio.wait_for(replica_state.pipeline(), timeout=1)
