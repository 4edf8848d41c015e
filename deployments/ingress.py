"""The Ingress deployment: the FastAPI app of trex_serve.web.http_app, wired to Ray. Each request makes
one hop per attempt: Serve's router picks a ProviderPool replica, and the request is relayed over
HTTP to that replica's own port (ARCHITECTURE.md)."""

from __future__ import annotations

import asyncio
import logging

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.logs import route_core_logs
from trex_serve import replica_state
from trex_serve.hop.relay import HttpRelay
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
        self.pools = pools
        self.router = router
        self.runtime = await Runtime.create(args)
        self.planner = Planner(HealthPolicy(**self.runtime.catalog.health.model_dump()))
        self.relay = HttpRelay(self._pick, args["pool_secret"])
        pipeline = Pipeline(self.runtime.catalog, self.runtime.settings, self.runtime.gate,
                            self.runtime.keyed(self.relay),
                            self.planner, self.runtime.record)
        self.runtime.planner = self.planner
        replica_state.publish(pipeline, self.runtime.admin_app())
        self._poller = asyncio.create_task(self._poll_routing_table(float(args.get("table_poll_s", 0.25))))

    async def _pick(self, provider: str, exclude: set[tuple[str, int]]) -> tuple[str, int]:
        handle = self.pools.get(provider)
        if handle is None:
            raise LookupError(f"no pool deployment for provider {provider!r}")
        endpoint: tuple[str, int] | None = None
        for _ in range(3):
            async with handle.choose_replica(_reserve=False) as sel:
                endpoint = (sel.replica_metadata.get("host") or sel.node_ip, int(sel.replica_metadata["port"]))
            if endpoint not in exclude:
                break
        assert endpoint is not None
        return endpoint

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
