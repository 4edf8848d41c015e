"""A ProviderCaller that spreads a provider's managed keys over accounts (``upstream_keys``): the
account's key first, the next one when it is cooling, out or over budget, and a 429/401/403 from
a key moves the request to the provider's next key before the pipeline ever falls back to another
provider. Requests with a key of the account's own (a binding, ``X-Upstream-Api-Key``) and
providers without ``keys`` in the catalog pass straight through."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from trex_serve.catalog import Catalog, Provider, UpstreamKey
from trex_serve.hop import contract as hop
from trex_serve.providers.base import Usage
from trex_serve.providers.sse import parse_usage_comment
from trex_serve.routing.upstream_keys import KeyState, KeyStore, rendezvous_order

log = logging.getLogger("trex.keys")

KEY_STATES = ("active", "cooling", "out")
KEYS_EXHAUSTED = "keys_exhausted"
# Called once per key taken out (by the replica whose mark took it out): provider, key id, status.
OnKeyOut = Callable[[str, str, int], Awaitable[None]]


class KeyMetrics:
    """Per-key counters in a replica's registry (summed over replicas like the others). The state
    gauges are read from Redis, which every replica shares, when /metrics is scraped: they live in a
    registry of their own that is never exchanged, so no replica's stale copy can outlive a state."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.live = CollectorRegistry(auto_describe=True)
        self.requests = Counter("trex_upstream_key_requests_total", "Requests sent with a managed key, by "
                                "provider, key id and the upstream's status.", ["provider", "key", "status"],
                                registry=registry)
        self.spills = Counter("trex_upstream_key_spills_total", "Times a managed key was passed over, by why "
                              "(cooling, out, rpm, tpm).", ["provider", "key", "reason"], registry=registry)
        self.outs = Counter("trex_upstream_key_out_total", "Managed keys taken out after a 401/403.",
                            ["provider", "key"], registry=registry)
        self.state = Gauge("trex_upstream_key_state", "Managed key state (1 = current).",
                           ["provider", "key", "state"], registry=self.live)
        self.rpm_used = Gauge("trex_upstream_key_rpm_used", "Requests sent with the key in the last 60 s "
                              "(counted only for keys with an rpm budget).", ["provider", "key"], registry=self.live)

    def refresh(self, states: dict[tuple[str, str], KeyState]) -> None:
        for (provider, key_id), st in states.items():
            for state in KEY_STATES:
                self.state.labels(provider, key_id, state).set(1.0 if st.state == state else 0.0)
            self.rpm_used.labels(provider, key_id).set(st.rpm_used)

    def exposition(self) -> bytes:
        return generate_latest(self.live)


def _exhausted(provider: str, wait_s: float | None) -> hop.HopResponse:
    body = orjson.dumps({"error": {"message": f"every managed key of {provider} is cooling, out or over "
                                              "its budget", "type": "upstream_error", "code": KEYS_EXHAUSTED}})
    return hop.HopResponse(503, {}, body, failure=KEYS_EXHAUSTED,
                           retry_after=None if wait_s is None else max(1.0, wait_s))


class KeyedCaller:
    def __init__(self, caller: hop.ProviderCaller, catalog: Catalog, store: KeyStore,
                 metrics: KeyMetrics | None = None, on_out: OnKeyOut | None = None) -> None:
        self.caller = caller
        self.catalog = catalog
        self.store = store
        self.metrics = metrics
        self.on_out = on_out
        self._seq = itertools.count()
        # Keys whose variable is unset here are never offered (checked once: the environment is fixed).
        self._ready = {p.name: [k for k in p.keys if k.secret()] for p in catalog.providers if p.keys}

    async def __call__(self, req: hop.HopRequest) -> hop.HopResponse:
        keys = self._ready.get(req.provider)
        if req.api_key or keys is None:
            return await self.caller(req)
        spec: Provider = self.catalog.provider(req.provider)  # type: ignore[assignment]
        order = rendezvous_order(req.account_id or req.request_id, keys)
        failed: list[dict[str, Any]] = []
        soonest: float | None = None  # the shortest Retry-After among this request's 429s
        while order:
            member = f"{req.request_id}:{next(self._seq)}"
            pick = await self.store.pick(spec.name, order, member, req.tokens_estimate)
            self._count_spills(spec.name, pick.skipped)
            if pick.key is None:
                resp = _exhausted(spec.name, pick.wait_s)
                resp.extra["key_attempts"] = failed
                return resp
            key = pick.key
            t0 = time.monotonic()
            resp = await self.caller(replace(req, key_id=key.key_id))
            if self.metrics is not None:
                self.metrics.requests.labels(spec.name, key.key_id, str(resp.status)).inc()
            if await self._key_trouble(spec, key, resp):
                failed.append({"provider": spec.name, "model": req.upstream_model, "status": resp.status,
                               "error": resp.failure or f"http_{resp.status}", "key": key.key_id,
                               "latency_ms": round((time.monotonic() - t0) * 1000, 2)})
                order = [k for k in order if k.key_id != key.key_id]
                if resp.status == 429:
                    wait = resp.retry_after or spec.key_cooldown_s
                    soonest = wait if soonest is None else min(soonest, wait)
                continue
            resp.extra["key"] = key.key_id
            resp.extra["key_attempts"] = failed
            if key.tpm and resp.ok:
                await self._true_up(spec.name, key, member, resp)
            return resp
        resp = _exhausted(spec.name, soonest)
        resp.extra["key_attempts"] = failed
        return resp

    async def _key_trouble(self, spec: Provider, key: UpstreamKey, resp: hop.HopResponse) -> bool:
        """A 429 cools this key alone, a 401/403 takes it out; either way the request tries the next."""
        if resp.failure is None and resp.status == 429:
            seconds = resp.retry_after if resp.retry_after else spec.key_cooldown_s
            if await self.store.cool(spec.name, key.key_id, seconds):
                log.warning("managed key %s of %s answered 429: cooling for %.0f s", key.key_id, spec.name, seconds)
            return True
        if (resp.failure is None and resp.status in (401, 403)) or resp.failure == "key_unset":
            if await self.store.take_out(spec.name, key.key_id, spec.key_out_s):
                log.error("managed key %s of %s answered %s: taken out for %.0f s", key.key_id, spec.name,
                          resp.status, spec.key_out_s)
                if self.metrics is not None:
                    self.metrics.outs.labels(spec.name, key.key_id).inc()
                if self.on_out is not None:
                    try:
                        await self.on_out(spec.name, key.key_id, resp.status)
                    except Exception:
                        log.warning("could not record that key %s of %s is out", key.key_id, spec.name,
                                    exc_info=True)
            return True
        return False

    def _count_spills(self, provider: str, skipped: tuple[tuple[str, str], ...]) -> None:
        if self.metrics is not None:
            for key_id, reason in skipped:
                self.metrics.spills.labels(provider, key_id, reason).inc()

    async def _true_up(self, provider: str, key: UpstreamKey, member: str, resp: hop.HopResponse) -> None:
        """Replace the TPM estimate with what the upstream reported: at once for a whole answer, at
        the end of a stream (read from the usage comment the pool appends)."""
        if resp.chunks is None:
            usage = Usage.from_header(resp.headers.get(hop.H_USAGE))
            if usage is not None:
                await self.store.used_tokens(provider, key.key_id, member,
                                             usage.prompt_tokens + usage.completion_tokens)
            return
        resp.chunks = self._watch(resp.chunks, provider, key.key_id, member)

    async def _watch(self, chunks: AsyncIterator[bytes], provider: str, key_id: str,
                     member: str) -> AsyncIterator[bytes]:
        tail = b""
        async for chunk in chunks:
            tail = (tail + chunk)[-512:]
            yield chunk
        parsed = parse_usage_comment(tail)
        if parsed is not None:
            try:
                await self.store.used_tokens(provider, key_id, member,
                                             parsed.prompt_tokens + parsed.completion_tokens)
            except Exception:  # the estimate stays: budgets err on the safe side
                log.warning("could not true up the TPM of key %s of %s", key_id, provider, exc_info=True)

    def ready(self, provider: str) -> list[UpstreamKey]:
        """The provider's managed keys whose variable is set in this process."""
        return list(self._ready.get(provider, ()))

    @property
    def keyed(self) -> bool:
        return bool(self._ready)

    async def states(self) -> dict[tuple[str, str], KeyState]:
        return await self.store.states([p for p in self.catalog.providers if p.keys])
