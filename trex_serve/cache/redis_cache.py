"""The response cache's entries in Redis, shared by every replica.

Bounded twice: an entry over ``max_entry_bytes`` is not kept at all, and the entries together never
take more than ``max_bytes``: one Lua call per write evicts, atomically, what expired, then the
entries closest to their expiry until the new one fits. Each entry also carries its own TTL, so
Redis drops it on time (and with ``maxmemory-policy allkeys-lru`` on a Redis of its own,
``TREX_CACHE_REDIS_URL``, under memory pressure too).

The cache never fails a request: every call is bounded by a short timeout, and after an error the
cache is skipped for a few seconds (the requests go to the provider as usual, answered ``miss``)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from trex_serve.admission.redis_urls import async_client, close_async

log = logging.getLogger("trex.cache")

_MAGIC = b"trex-cache-1\n"

# KEYS: 1 the entry, 2 the index (sorted set: entry -> expiry ms), 3 sizes (hash: entry -> bytes),
# 4 the total bytes. ARGV: 1 value, 2 ttl ms, 3 the bound on the total. Entries evicted here are
# deleted by name (single Redis or a primary, as the counter store: not Redis Cluster).
_PUT_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local total = tonumber(redis.call('GET', KEYS[4]) or '0')
local function drop(k)
  local size = tonumber(redis.call('HGET', KEYS[3], k) or '0')
  redis.call('HDEL', KEYS[3], k)
  redis.call('ZREM', KEYS[2], k)
  total = total - size
end
for _, k in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 128)) do drop(k) end
if redis.call('HEXISTS', KEYS[3], KEYS[1]) == 1 then drop(KEYS[1]) end
local size = string.len(ARGV[1])
local bound = tonumber(ARGV[3])
while total + size > bound do
  local first = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if not first then break end
  redis.call('DEL', first)
  drop(first)
end
if total < 0 then total = 0 end
if total + size > bound then
  redis.call('SET', KEYS[4], string.format('%d', total))
  return 0
end
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
redis.call('ZADD', KEYS[2], now + ttl, KEYS[1])
redis.call('HSET', KEYS[3], KEYS[1], size)
redis.call('SET', KEYS[4], string.format('%d', total + size))
return 1
"""


@dataclass
class Entry:
    """A cached answer: a whole JSON body or an SSE stream, as the client received it."""

    kind: str  # "json" | "sse"
    body: bytes
    created: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)  # provider and model that answered

    def encode(self) -> bytes:
        head = orjson.dumps({"k": self.kind, "t": self.created, "m": self.meta})
        return _MAGIC + head + b"\n" + self.body

    @classmethod
    def decode(cls, raw: bytes) -> Entry | None:
        if not raw.startswith(_MAGIC):
            return None
        head, sep, body = raw[len(_MAGIC):].partition(b"\n")
        if not sep:
            return None
        try:
            meta = orjson.loads(head)
        except orjson.JSONDecodeError:
            return None
        return cls(str(meta.get("k")), body, float(meta.get("t") or 0), meta.get("m") or {})


class ResponseCache:
    def __init__(self, client: aioredis.Redis, prefix: str = "trex:", *, max_bytes: int = 256 << 20,
                 max_entry_bytes: int = 1 << 20, timeout_s: float = 0.25, cooldown_s: float = 5.0) -> None:
        self.client = client
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.timeout_s = timeout_s
        self.cooldown_s = cooldown_s
        self._down_until = 0.0
        self._put = client.register_script(_PUT_LUA)

    @classmethod
    def from_url(cls, url: str, prefix: str = "trex:", **kwargs: Any) -> ResponseCache:
        # A short connect timeout: a cache that cannot be reached must cost a request little.
        client = async_client(url, decode_responses=False, socket_timeout=1.0, socket_connect_timeout=0.5)
        return cls(client, prefix, **kwargs)

    async def aclose(self) -> None:
        await close_async(self.client)

    def _k(self, *parts: str) -> str:
        return self.prefix + "cache:" + ":".join(parts)

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, exc: BaseException) -> None:
        if self.available:
            log.warning("response cache unavailable (%s: %s: %s); skipped for %.0f s", what, type(exc).__name__,
                        exc, self.cooldown_s)
        self._down_until = time.monotonic() + self.cooldown_s

    async def get(self, account_id: str, digest: str) -> Entry | None:
        """The entry, or None (not there, or the cache unavailable: the caller asks the provider)."""
        if not self.available:
            return None
        try:
            async with asyncio.timeout(self.timeout_s):
                raw = await self.client.get(self._k(account_id, digest))
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("read", exc)
            return None
        return Entry.decode(raw) if raw else None

    async def put(self, account_id: str, digest: str, entry: Entry, ttl_s: int) -> bool:
        """Keep ``entry`` for ``ttl_s`` seconds; False when it is too big or was not kept."""
        value = entry.encode()
        if ttl_s <= 0 or len(value) > self.max_entry_bytes or not self.available:
            return False
        keys = [self._k(account_id, digest), self._k("index"), self._k("sizes"), self._k("bytes")]
        try:
            async with asyncio.timeout(self.timeout_s):
                return bool(await self._put(keys=keys, args=[value, int(ttl_s * 1000), self.max_bytes]))
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("write", exc)
            return False
