"""The Ingress deployment: the FastAPI app of trex_serve.web.http_app, wired to Ray. Each request makes
one hop per attempt: a ProviderPool replica is picked from the ingress's local view of the pool
(pool_view.py, kept fresh from Serve's router), and the request is relayed over HTTP to that
replica's own port (ARCHITECTURE.md). The hot routes also arrive on a port of the replica's own,
straight from the front proxy (web/data_server.py), skipping Serve's proxy and FastAPI."""

from __future__ import annotations

import asyncio
import logging
import os

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments import replica_state, stage_probe
from deployments.logs import route_core_logs
from deployments.pool_view import PoolView
from trex_serve.billing.prices import target_cost
from trex_serve.gc_settings import settle_heap
from trex_serve.hop.relay import HttpRelay
from trex_serve.pipeline.request_path import Pipeline
from trex_serve.routing.health import HealthPolicy
from trex_serve.routing.resolve import Planner
from trex_serve.runtime import Runtime
from trex_serve.web.data_endpoints import Announcer
from trex_serve.web.data_server import DataServer
from trex_serve.web.front_id import front_secret
from trex_serve.web.http_app import build_http_app

log = logging.getLogger("trex.ingress")
# A withdrawn data server keeps answering this long: the front's sync loop polls every 0.25 s.
DATA_SERVER_LINGER_S = 1.5

http_app = build_http_app(replica_state.pipeline, replica_state.admin_app)


@serve.deployment(max_ongoing_requests=100000, ray_actor_options={"num_cpus": 0})
@serve.ingress(http_app)
class Ingress:
    async def __init__(self, args: dict, pools: dict[str, DeploymentHandle], router: DeploymentHandle,
                       spreader: DeploymentHandle | None = None) -> None:
        """``spreader`` is never called: bound here so that Serve deploys the spread supervisor
        (spreader.py) with the app."""
        route_core_logs()
        stage_probe.install_ingress()  # stage timers for scripts/bench_stages.py; off unless TREX_STAGE_PROBE
        self.pools = pools
        self.router = router
        self.runtime = await Runtime.create(args)
        self.planner = Planner(HealthPolicy(**self.runtime.catalog.health.model_dump()),
                               cost=target_cost(self.runtime.catalog))
        # Pool replicas are chosen from a local view of them, not by asking Serve per request (pool_view.py).
        self.pool_view = PoolView(pools)
        self.pool_view.start()
        self.relay = HttpRelay(self.pool_view.pick, args["pool_secret"], tracker=self.pool_view)
        pipeline = Pipeline(self.runtime.catalog, self.runtime.settings, self.runtime.gate,
                            self.runtime.keyed(self.relay),
                            self.planner, self.runtime.record, stored=self.runtime.stored, cache=self.runtime.cache)
        self.runtime.planner = self.planner
        replica_state.publish(pipeline, self.runtime.admin_app())
        self._poller = asyncio.create_task(self._poll_routing_table(float(args.get("table_poll_s", 0.25))))
        self.data_server, self.announcer = await self._start_data_server()
        settle_heap()

    async def _start_data_server(self) -> tuple[DataServer | None, Announcer | None]:
        """The hot routes' direct server (web/data_server.py), for the front proxy only: without the
        front's secret nothing could call it."""
        if not front_secret(self.runtime.settings.secret_key) or os.environ.get("TREX_DATA_SERVER", "1") == "0":
            return None, None
        server = DataServer(replica_state.pipeline)
        host = ray.util.get_node_ip_address()
        port = await server.start(host)
        counters = self.runtime.counters
        announcer = Announcer(counters.client, f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                              counters.prefix)
        await announcer.announce()
        announcer.start()
        log.info("data server on %s:%d", host, port)
        return server, announcer

    async def __del__(self) -> None:
        """Serve is stopping this replica (a redeploy, a scale-down): the front proxy stops sending to
        its data server first, then the requests on it finish, then it closes."""
        if self.announcer is not None:
            await self.announcer.withdraw()
        if self.data_server is not None:
            await asyncio.sleep(DATA_SERVER_LINGER_S)  # the front's sync loop and HAProxy catch up
            await self.data_server.drain(timeout=40)
            await self.data_server.stop()

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
