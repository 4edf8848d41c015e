"""Where the ingress replicas' direct data servers (data_server.py) listen, kept in Redis for the
front proxy: each replica announces ``host:port`` with an expiry it renews every second, withdraws
it when it shuts down, and the front proxy's sync loop (local/front_sync.py) reads the live set.
A replica that dies without a word (a lost node) falls out when its entry expires; before that the
front proxy's health checks have already stopped sending to it."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

ANNOUNCE_EVERY_S = 1.0
EXPIRES_AFTER_S = 4.0
log = logging.getLogger("trex.data_endpoints")


def registry_key(prefix: str = "trex:") -> str:
    return f"{prefix}ingress:data"


def live_endpoints(client: Any, prefix: str = "trex:") -> list[str]:
    """The announced endpoints not yet expired (a synchronous redis-py client, for the front side)."""
    key, now = registry_key(prefix), time.time()
    pipe = client.pipeline()
    pipe.zremrangebyscore(key, "-inf", now - 60)
    pipe.zrangebyscore(key, now, "+inf")
    members = pipe.execute()[1]
    return sorted(m.decode() if isinstance(m, bytes) else m for m in members)


class Announcer:
    """The replica side: renews ``endpoint`` in the registry until withdrawn (an asyncio redis client)."""

    def __init__(self, client: Any, endpoint: str, prefix: str = "trex:") -> None:
        self.client = client
        self.endpoint = endpoint
        self.key = registry_key(prefix)
        self._task: asyncio.Task | None = None

    async def announce(self) -> None:
        await self.client.zadd(self.key, {self.endpoint: time.time() + EXPIRES_AFTER_S})

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                await self.announce()
            except Exception:  # Redis away: the entry expires and the front proxy uses Serve's path
                log.warning("could not announce the data endpoint %s", self.endpoint, exc_info=True)
            await asyncio.sleep(ANNOUNCE_EVERY_S)

    async def withdraw(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        try:
            await self.client.zrem(self.key, self.endpoint)
        except Exception:
            log.warning("could not withdraw the data endpoint %s", self.endpoint, exc_info=True)
