"""One ProviderPool deployment per catalog provider. Each replica runs the core's PoolServer on its
own port (published through replica metadata) so the ingress relays to it over HTTP: the one hop."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments import stage_probe
from deployments.logs import route_core_logs
from trex_serve.catalog import load_catalog
from trex_serve.gc_settings import settle_heap
from trex_serve.hop.pool_server import PoolServer
from trex_serve.routing.health import Outcome, OutcomeBatch

log = logging.getLogger("trex.pool")


def inflight_policy(ctx) -> tuple[float, dict]:
    """Serve cannot see relayed requests, so pools scale on the in-flight count they report."""
    target = float((ctx.config.target_ongoing_requests if ctx.config else None) or 256)
    metrics = ctx.aggregated_metrics or {}
    inflight = sum((metrics.get("inflight") or {}).values())
    current = max(1, ctx.current_num_replicas)
    if not metrics.get("inflight"):
        return ctx.current_num_replicas, {}
    return max(1.0, inflight / target) if inflight else current * 0.5, {}


@serve.deployment(max_ongoing_requests=100000, ray_actor_options={"num_cpus": 0})
class ProviderPool:
    async def __init__(self, provider: str, catalog_path: str, secret: str, router: DeploymentHandle,
                       report_interval_s: float = 0.25, catalog_sha: str = "") -> None:
        route_core_logs()
        stage_probe.install_pool()  # off unless TREX_STAGE_PROBE (scripts/bench_stages.py)
        catalog = load_catalog(catalog_path)
        spec = catalog.provider(provider)
        if spec is None:
            raise ValueError(f"provider {provider!r} is not in {catalog_path}")
        self.provider = provider
        self.router = router
        self._outcomes = OutcomeBatch()
        self._urgent = asyncio.Event()
        self.server = PoolServer({provider: spec}, secret, self._outcome,
                                 max_connections=spec.pool.max_concurrency)
        self.host = ray.util.get_node_ip_address()
        self.port = await self.server.start(self.host, 0)
        self._reporter = asyncio.create_task(self._report_loop(report_interval_s))
        settle_heap()
        log.info("pool %s listening on %s:%s", provider, self.host, self.port)

    def record_replica_metadata(self) -> dict:
        return {"port": self.port, "host": self.host}

    async def record_autoscaling_stats(self) -> dict:
        return {"inflight": float(self.server.inflight)}

    def _outcome(self, outcome: Outcome) -> None:
        if self._outcomes.add(outcome):
            self._urgent.set()  # a provider×model answering again: report now, not in up to `interval`

    async def _report_loop(self, interval: float) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._urgent.wait(), interval)
            self._urgent.clear()
            batch = self._outcomes.take()
            if not batch:
                continue
            try:
                await self.router.report.remote(batch)
            except Exception:  # the router restarting must not take the pool down
                log.warning("could not report %d outcomes to the router", len(batch), exc_info=True)
            await asyncio.sleep(0.05)  # a floor on the report rate, whatever flaps

    async def __call__(self) -> dict:
        return {"provider": self.provider, "port": self.port, "inflight": self.server.inflight}

    async def check_health(self) -> None:
        if self.port is None or self.server.session is None or self.server.session.closed:
            raise RuntimeError("pool server is not running")

    async def __del__(self) -> None:
        # Serve does not see relayed requests: finish the ones in flight before going away.
        await self.server.stop(drain_s=55)
        self._reporter.cancel()
