"""An open gate for unit tests of the data path alone (routing, fallback, streaming): it lets every
request through and counts settlements, so tests can assert exactly-once settlement."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from trex_serve.admission.gate import AdmitAsk, Principal, Settlement, Ticket
from trex_serve.hop.pool_server import PoolServer
from trex_serve.hop.relay import HttpRelay
from trex_serve.pipeline.request_path import Pipeline
from trex_serve.routing.health import HealthPolicy, HealthTracker
from trex_serve.routing.resolve import Planner, Resolution, RoutingTable
from trex_serve.settings import Settings
from trex_serve.web.data_server import DataServer
from trex_serve.web.front_id import AUTH_HEADER, front_secret
from trex_serve.web.http_app import build_http_app


class CountingGate:
    def __init__(self, catalog) -> None:
        self.catalog = catalog
        self.settlements: list[Settlement] = []
        self.admitted = 0
        # A slow counter store, when set: the settle call is written after this pause and its
        # reply comes after another; ``events`` says which has happened.
        self.settle_lag_s = 0.0
        self.settle_error: Exception | None = None  # raised before the call could be written
        self.reply_error: Exception | None = None  # raised after it was written (the reply lost)
        self.events: list[str] = []

    async def authenticate(self, authorization, client_ip) -> Principal:
        return Principal("key_test", "acc_test", "trex-test", "free")

    def visible_models(self, principal) -> list[str]:
        return ["smart-auto", *[m.id for m in self.catalog.models]]

    def check_model(self, principal, resolution: Resolution) -> None:
        return None

    async def admit(self, principal, ask: AdmitAsk) -> Ticket:
        self.admitted += 1
        return Ticket(principal, "quota", ask.request_id, ask.prompt_tokens, 0, "lease-1")

    async def provider_key(self, principal, provider, override):
        return override

    async def settle(self, ticket, settlement: Settlement, sent=None) -> int:
        self.settlements.append(settlement)
        await asyncio.sleep(self.settle_lag_s)
        if self.settle_error is not None:
            raise self.settle_error
        if sent is not None:
            sent.set_result(None)
            self.events.append("settle sent")
        await asyncio.sleep(self.settle_lag_s)
        if self.reply_error is not None:
            raise self.reply_error
        self.events.append("settle replied")
        return 0


@asynccontextmanager
async def data_path_client(catalog, policy: HealthPolicy | None = None,
                           front: str = "fastapi") -> AsyncIterator[httpx.AsyncClient]:
    """The data path alone, in process: HTTP front end → pipeline → relay hop (real HTTP) → pool
    server, with this open gate and a health tracker fed by the pool's outcome reports. ``front``
    is the FastAPI app (``"fastapi"``, through ASGI) or the direct data server (``"direct"``, over
    real HTTP, called as the front proxy calls it). The client carries ``.gate``, ``.tracker`` and
    ``.records`` (the request records the pipeline wrote)."""
    tracker = HealthTracker(policy)
    planner = Planner(policy)
    version = 0

    def report(outcome) -> None:
        nonlocal version
        tracker.record(outcome)
        version += 1
        planner.update(RoutingTable(tracker.snapshot(), version))

    pool = PoolServer({p.name: p for p in catalog.providers}, "s3cret", report)
    port = await pool.start()

    async def pick(provider, exclude):
        return ("127.0.0.1", port)

    relay = HttpRelay(pick, "s3cret")
    gate = CountingGate(catalog)
    records: list = []
    pipeline = Pipeline(catalog, Settings(max_body_bytes=64 * 1024, secret_key="test-secret-key"), gate, relay,
                        planner, records.append)

    async def ref():
        return pipeline

    data_server = DataServer(ref) if front == "direct" else None
    try:
        if data_server is not None:
            data_port = await data_server.start("127.0.0.1")
            client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{data_port}",
                                       headers={AUTH_HEADER: front_secret("test-secret-key"),
                                                "X-Forwarded-For": "203.0.113.7"})
        else:
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_http_app(ref)), base_url="http://gw")
        async with client:
            client.gate = gate
            client.tracker = tracker
            client.records = records
            yield client
    finally:
        await relay.close()
        await pool.stop()
        if data_server is not None:
            await data_server.stop()
