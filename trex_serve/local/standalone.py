"""The whole gateway in one process without Ray: the same runtime, pipeline and HTTP app as the
Serve deployment, with a local pool server on the other end of the relay hop. Used by the tests
(in-process integration, the browser test) and handy for debugging the request path."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI

from trex_serve.admission.counters import CounterStore
from trex_serve.billing.prices import target_cost
from trex_serve.catalog import Catalog
from trex_serve.hop.pool_server import PoolServer
from trex_serve.hop.relay import HttpRelay
from trex_serve.pipeline.request_path import Pipeline
from trex_serve.routing.resolve import Planner
from trex_serve.runtime import Runtime
from trex_serve.settings import Settings
from trex_serve.store.database import create_engine, migrate
from trex_serve.store.repository import Repository
from trex_serve.web.http_app import build_http_app


@dataclass
class Standalone:
    app: FastAPI
    runtime: Runtime
    pipeline: Pipeline


@asynccontextmanager
async def standalone_gateway(settings: Settings, catalog: Catalog, counters_prefix: str = "trex:",
                             pool: tuple[tuple[str, int], str] | None = None) -> AsyncIterator[Standalone]:
    """``pool``: the address and hop secret of a pool server running elsewhere (another process,
    as in the deployment); without it one runs in this process."""
    engine = create_engine(settings.database_url or None)
    migrate(engine)
    repo = Repository(engine, settings.secret_key)
    repo.sync_plans([p.model_dump() for p in catalog.plans])
    runtime = Runtime(settings, catalog, repo, CounterStore.from_url(settings.redis_url, prefix=counters_prefix,
                                                                     durability=settings.durability()))
    runtime.start()
    if pool is None:
        hop_secret = secrets.token_urlsafe(16)
        local_pool: PoolServer | None = PoolServer({p.name: p for p in catalog.providers}, hop_secret)
        address = ("127.0.0.1", await local_pool.start())  # type: ignore[union-attr]
    else:
        (address, hop_secret), local_pool = pool, None

    async def pick(_provider: str, _exclude: set) -> tuple[str, int]:
        return address

    relay = HttpRelay(pick, hop_secret)
    planner = runtime.planner = Planner(cost=target_cost(catalog))
    pipeline = Pipeline(catalog, settings, runtime.gate, runtime.keyed(relay), planner, runtime.record,
                        stored=runtime.stored, cache=runtime.cache)
    admin_app = runtime.admin_app()

    async def pipeline_ref() -> Pipeline:
        return pipeline

    async def admin_ref() -> FastAPI:
        return admin_app

    try:
        yield Standalone(build_http_app(pipeline_ref, admin_ref), runtime, pipeline)
    finally:
        await runtime.close()
        await relay.close()
        if local_pool is not None:
            await local_pool.stop()
        engine.dispose()
