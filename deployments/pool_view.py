"""Which pool replica a relayed request goes to, chosen locally.

Asking Serve's router per request (``choose_replica``) crosses into the router's own thread and
back: ~0.5 ms p50 on the one-connection path, and CPU at load. The ingress instead keeps, per pool,
the list of running replicas' endpoints that the handle's router already holds (pushed to it by
Serve's controller), copied every ``refresh_s``, and picks among them by power of two choices on
its own in-flight counts. A refused connection takes that endpoint out of the choice for
``down_s`` (the relay then tries another). Until the router's list is known (the first request
after start), and whenever it is empty, the pick falls back to ``choose_replica``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

from ray.serve.handle import DeploymentHandle

log = logging.getLogger("trex.pool_view")

Endpoint = tuple[str, int]


def running_endpoints(handle: DeploymentHandle) -> list[Endpoint] | None:
    """The endpoints (host, port) the handle's router would route to, or None when its view is not
    there yet (never used) or this Ray has no such internals. Read-only: a list the router replaces
    whole on every update, so reading it from this thread is safe."""
    try:
        router = handle._router  # noqa: SLF001 - Serve keeps no public list of running replicas
        inner = getattr(router, "_asyncio_router", router)
        request_router = inner._request_router  # noqa: SLF001
        if request_router is None:
            return None
        replicas: list[Any] = list(request_router._replicas_list)  # noqa: SLF001
    except AttributeError:
        return None
    out: list[Endpoint] = []
    for replica in replicas:
        meta = replica.replica_metadata or {}
        if "port" not in meta:
            continue  # still starting: it publishes its port once its server listens
        out.append((meta.get("host") or replica._replica_info.node_ip, int(meta["port"])))  # noqa: SLF001
    return out


class PoolView:
    def __init__(self, pools: dict[str, DeploymentHandle], refresh_s: float = 0.5, down_s: float = 5.0) -> None:
        self.pools = pools
        self.refresh_s = refresh_s
        self.down_s = down_s
        self.endpoints: dict[str, list[Endpoint]] = {}
        self.inflight: dict[Endpoint, int] = {}
        self._down: dict[Endpoint, float] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._refresh_loop())

    def refresh(self) -> None:
        for provider, handle in self.pools.items():
            found = running_endpoints(handle)
            if found is not None:
                self.endpoints[provider] = found

    async def _refresh_loop(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception:  # a Ray upgrade changing internals must not stop the gateway
                log.warning("could not read the pools' replicas; choosing through Serve", exc_info=True)
                self.endpoints.clear()
            await asyncio.sleep(self.refresh_s)

    def _usable(self, provider: str, exclude: set[Endpoint]) -> list[Endpoint]:
        now = time.monotonic()
        return [e for e in self.endpoints.get(provider, ()) if e not in exclude and self._down.get(e, 0.0) <= now]

    async def pick(self, provider: str, exclude: set[Endpoint]) -> Endpoint:
        handle = self.pools.get(provider)
        if handle is None:
            raise LookupError(f"no pool deployment for provider {provider!r}")
        usable = self._usable(provider, exclude)
        if len(usable) == 1:
            return usable[0]
        if usable:
            a, b = random.sample(usable, 2)
            return a if self.inflight.get(a, 0) <= self.inflight.get(b, 0) else b
        return await self._serve_pick(handle, exclude)

    async def _serve_pick(self, handle: DeploymentHandle, exclude: set[Endpoint]) -> Endpoint:
        endpoint: Endpoint | None = None
        for _ in range(3):
            async with handle.choose_replica(_reserve=False) as sel:
                endpoint = (sel.replica_metadata.get("host") or sel.node_ip, int(sel.replica_metadata["port"]))
            if endpoint not in exclude:
                break
        assert endpoint is not None
        return endpoint

    def started(self, endpoint: Endpoint) -> None:
        self.inflight[endpoint] = self.inflight.get(endpoint, 0) + 1

    def finished(self, endpoint: Endpoint) -> None:
        left = self.inflight.get(endpoint, 0) - 1
        if left > 0:
            self.inflight[endpoint] = left
        else:
            self.inflight.pop(endpoint, None)

    def unreachable(self, endpoint: Endpoint) -> None:
        """A refused or reset connection: leave this endpoint out until Serve's view has moved on."""
        self._down[endpoint] = time.monotonic() + self.down_s
        if len(self._down) > 1024:
            now = time.monotonic()
            self._down = {e: t for e, t in self._down.items() if t > now}
