"""Builds the live collaborators of one ingress replica from settings: store, counters, gate,
writers, operator API. Ray-free, so tests build the same runtime without a cluster."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import replace
from typing import Any

from fastapi import FastAPI

from trex_serve.admission.counters import CounterStore
from trex_serve.admission.keygate import KeyGate
from trex_serve.billing import pricing as billing
from trex_serve.billing.balances import booked_totals
from trex_serve.billing.durable_streams import DurableChannel, StreamDrainer, appender, consumer_name
from trex_serve.billing.prices import price_book
from trex_serve.billing.writer import BatchWriter
from trex_serve.cache.redis_cache import ResponseCache
from trex_serve.catalog import Catalog, load_catalog
from trex_serve.conversations.service import StoredResponses
from trex_serve.conversations.store import ResponseStore
from trex_serve.hop.contract import ProviderCaller
from trex_serve.observability import tracing
from trex_serve.observability.metrics import GatewayMetrics
from trex_serve.observability.metrics_exchange import MetricsExchange, metrics_response
from trex_serve.observability.request_record import RequestRecord
from trex_serve.routing.managed_key_caller import KeyedCaller, KeyMetrics
from trex_serve.routing.upstream_keys import KeyStore
from trex_serve.settings import Settings
from trex_serve.store.database import create_engine, migrate
from trex_serve.store.repository import Repository
from trex_serve.web.admin_api import build_admin_router

log = logging.getLogger("trex.runtime")


class Runtime:
    def __init__(self, settings: Settings, catalog: Catalog, repo: Repository, counters: CounterStore) -> None:
        self.settings = settings
        self.catalog = catalog
        self.repo = repo
        self.counters = counters
        # Every record becomes durable in a Redis stream and is drained into SQL by every replica
        # (billing/durable_streams.py); the ledger's rows are appended by the settlement script itself.
        self.consumer = consumer_name()
        self.ledger = self._channel("ledger", repo.append_ledger, with_writer=False)
        self.logs = self._channel("logs", repo.insert_logs)
        self.risk_events = self._channel("risk", repo.add_risk_events)
        self.gate = KeyGate(catalog, repo, counters, auth_failures_per_minute=settings.auth_failures_per_minute,
                            risk_event=self._risk_event)
        self._tasks: list[asyncio.Task] = []
        self.metrics = GatewayMetrics()
        self.metrics_exchange = MetricsExchange(counters.client, counters.prefix, None, self.metrics)
        self.observers: list[Any] = [self.metrics.observe]
        self.planner: Any = None
        self.key_metrics = KeyMetrics(self.metrics.registry)
        self.key_caller: KeyedCaller | None = None
        # Stored responses live in SQL, their content sealed with the secret that seals provider keys;
        # the response cache in Redis (its own, TREX_CACHE_REDIS_URL, or the counters').
        self.stored = StoredResponses(ResponseStore(repo.engine, settings.secret_key),
                                      settings.response_retention_days, self.metrics.stored_failures.inc)
        cache_url = settings.cache_redis_url or settings.redis_url
        self.cache = ResponseCache.from_url(cache_url, counters.prefix, max_bytes=settings.cache_max_bytes,
                                            max_entry_bytes=settings.cache_max_entry_bytes) if cache_url else None

    def keyed(self, caller: ProviderCaller) -> KeyedCaller:
        """Wrap the hop so providers with several managed keys spread, cool and budget them."""
        self.key_caller = KeyedCaller(caller, self.catalog, KeyStore(self.counters.client, self.counters.prefix),
                                      self.key_metrics, self._key_out)
        return self.key_caller

    async def _key_out(self, provider: str, key_id: str, status: int) -> None:
        spec = self.catalog.provider(provider)
        await self._key_audit("system", "upstream_key.out", f"{provider}/{key_id}",
                              {"status": status, "out_for_s": spec.key_out_s if spec else None})

    async def _key_audit(self, actor: str, action: str, target: str, detail: dict[str, Any]) -> None:
        await asyncio.to_thread(self.repo.add_audit, actor, action, "upstream_key", target, None, None, detail)

    @classmethod
    async def create(cls, args: dict[str, Any] | None = None) -> Runtime:
        """``args`` (from the app builder) override the environment's settings."""
        args = args or {}
        settings = Settings.from_env()
        overrides = {k: v for k, v in args.items() if k in Settings.__dataclass_fields__ and v}
        settings = replace(settings, **overrides)
        catalog = load_catalog(settings.catalog_path)
        # Loading the price database blocks ~0.15 s: here, not in the first request of each route.
        await asyncio.to_thread(price_book(catalog).warm)
        if not settings.secret_key:
            raise RuntimeError("TREX_SECRET_KEY must be set: it encrypts provider keys at rest")
        if not settings.redis_url:
            raise RuntimeError("TREX_REDIS_URL must be set (trex-serve up starts an embedded Redis)")
        engine = create_engine(settings.database_url or None)
        await asyncio.to_thread(migrate, engine)
        repo = Repository(engine, settings.secret_key)
        await asyncio.to_thread(repo.sync_plans, [p.model_dump() for p in catalog.plans])
        counters = CounterStore.from_url(settings.redis_url, durability=settings.durability())
        runtime = cls(settings, catalog, repo, counters)
        runtime.start()
        return runtime

    def _channel(self, name: str, write: Any, with_writer: bool = True) -> DurableChannel:
        client, prefix = self.counters.client, self.counters.prefix
        drainer = StreamDrainer(client, prefix, name, write, consumer=self.consumer,
                                claim_idle_ms=self.settings.stream_claim_idle_ms)
        # wake_at=1: each event-loop turn's rows leave for Redis together, right after the turn.
        writer = (BatchWriter(name, appender(client, prefix, name, self.counters.durability, self.counters.lean),
                              wake_at=1) if with_writer else None)
        return DurableChannel(drainer, writer)

    def _risk_event(self, row: dict[str, Any]) -> None:
        self.risk_events.put({**row, "event_id": uuid.uuid4().hex, "created_at": time.time()})

    def start(self) -> None:
        tracing.setup("ingress")
        for channel in (self.logs, self.ledger, self.risk_events):
            channel.start()
        self._tasks.append(self.counters.subscribe_invalidations(self.gate.invalidate))
        self._tasks.append(asyncio.get_running_loop().create_task(self._retention_loop(), name="log-retention"))
        self._tasks.append(asyncio.get_running_loop().create_task(self.stored.purge_loop(),
                                                                  name="response-retention"))
        self.metrics_exchange.start()

    async def close(self) -> None:
        self.counters.closing = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: redis-py may hold a cancelled pub/sub read until its next timeout.
            await asyncio.wait(self._tasks, timeout=3.0)
        for channel in (self.logs, self.ledger, self.risk_events):
            await channel.close()
        await self.metrics_exchange.stop()
        if self.cache is not None:
            await self.cache.aclose()
        await self.counters.aclose()
        if tracing.enabled():
            await asyncio.to_thread(tracing.flush)

    async def purge_old_logs(self) -> int:
        """Delete request logs older than TREX_LOG_RETENTION_DAYS (0 keeps them forever)."""
        from datetime import UTC, datetime, timedelta

        if self.settings.log_retention_days <= 0:
            return 0
        cutoff = datetime.now(UTC) - timedelta(days=self.settings.log_retention_days)
        return await asyncio.to_thread(self.repo.purge_logs, cutoff)

    async def _retention_loop(self, every_s: float = 3600.0) -> None:
        while True:
            try:
                removed = await self.purge_old_logs()
                if removed:
                    log.info("log retention: removed %d request-log rows", removed)
            except Exception:
                log.warning("log retention pass failed; will retry", exc_info=True)
            await asyncio.sleep(every_s)

    def record(self, rec: RequestRecord) -> None:
        self.logs.put(rec.row())
        for observer in self.observers:
            observer(rec)

    # ---- operator API --------------------------------------------------------------------------

    async def _on_change(self, kind: str, ident: str) -> None:
        self.gate.invalidate(kind, ident)
        await self.counters.publish_invalidation(kind, ident)

    async def _usage(self, account_id: str) -> dict[str, Any]:
        account = await asyncio.to_thread(self.repo.get_account, account_id)
        plan = self.catalog.plan(account["plan"]) if account else None
        used = await self.counters.quota_usage(account_id)
        limits = plan.daily_quota if plan else None
        live = await self.counters.get_balance(account_id)
        totals, unbooked = await booked_totals(self.counters, self.repo.ledger_totals, account_id)
        quota = {
            "requests_used": used.get("requests", 0), "tokens_used": used.get("tokens", 0),
            "requests_limit": limits.requests if limits else None, "tokens_limit": limits.tokens if limits else None,
            "resets_in_s": billing.seconds_to_utc_midnight(),
        }
        for what in ("requests", "tokens"):
            limit = quota[f"{what}_limit"]
            quota[f"{what}_left"] = None if limit is None else max(0, limit - quota[f"{what}_used"])
        return {"quota": quota, "live_balance_micro": live, "unbooked_micro": unbooked, "ledger_totals": totals}

    async def _on_credits(self, account_id: str, micro: int) -> int | None:
        return await self.counters.grant(account_id, micro)

    def refresh_metrics(self) -> None:
        table = self.planner.table if self.planner is not None else None
        if table is not None:
            channels = {"logs": self.logs, "ledger": self.ledger, "risk": self.risk_events}
            self.metrics.refresh(table, {n: c.writer for n, c in channels.items() if c.writer is not None},
                                 self.gate.suspensions, {n: c.drainer for n, c in channels.items()})

    def admin_app(self) -> FastAPI:
        """The control surface as its own small app, built once the replica's collaborators exist:
        the operator API and /metrics (served through the gateway's app by prefix)."""
        from fastapi.responses import Response

        from trex_serve.web.http_app import install_error_handlers

        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        install_error_handlers(app)

        @app.get("/metrics")
        async def metrics() -> Response:
            self.refresh_metrics()
            body, content_type = await metrics_response(self.metrics_exchange)
            if self.key_caller is not None and self.key_caller.keyed:
                try:
                    self.key_metrics.refresh(await self.key_caller.states())
                    body += self.key_metrics.exposition()
                except Exception:  # key states are read from Redis: its outage must not hide the rest
                    log.warning("metrics: reading managed key states failed", exc_info=True)
            return Response(body, headers={"Content-Type": content_type})

        app.include_router(build_admin_router(
            self.repo, self.settings.admin_token, self._on_change, usage_extra=self._usage,
            on_credits=self._on_credits, known_providers=lambda: [p.name for p in self.catalog.providers]))
        from trex_serve.web.account_api import build_account_router
        from trex_serve.web.dashboard import build_dashboard_router
        from trex_serve.web.upstream_keys_api import build_upstream_keys_router

        app.include_router(build_upstream_keys_router(
            self.settings.admin_token, lambda: self.key_caller,
            lambda action, target, detail: self._key_audit("operator", action, target, detail)))
        app.include_router(build_account_router(self.repo, self.settings.admin_token, lambda: self.catalog,
                                                 self._on_change, self._usage))
        app.include_router(build_dashboard_router())
        return app
