"""``TREX_REDIS_URL`` turned into clients: the one place that knows the URL forms, so every
connection the gateway makes (the counter store, its lean hot-path connection, the drainers, the
metrics exchange, the front proxy's sync loop, ``billing reconcile``) follows the same primary.

Besides redis-py's own ``redis://``, ``rediss://`` and ``unix://``, a Sentinel-managed primary:

    redis+sentinel://[user:password@]host[:port][,host[:port]...]/service_name[/db][?options]
    rediss+sentinel://...      (TLS to the Redis servers and to the sentinels)

redis-py has no URL form for Sentinel; this is the one the ``Redis-Sentinel-Url`` package defined
and other Python projects accept. The sentinels default to port 26379. ``user:password`` are the
Redis servers' credentials; ``sentinel_username`` / ``sentinel_password`` options authenticate to
the sentinels (which usually have none). Other options: ``socket_timeout`` and
``socket_connect_timeout`` (seconds, for both). The client asks the sentinels for the primary's
address on every new connection, so after a failover the next connection goes to the promoted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel as SyncSentinel

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_SENTINEL_PORT = 26379
_FLOAT_OPTIONS = ("socket_timeout", "socket_connect_timeout")
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")
_R = TypeVar("_R", aioredis.Redis, redis.Redis)  # the asyncio or the blocking client


@dataclass(frozen=True)
class SentinelUrl:
    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    options: dict[str, float] = field(default_factory=dict)

    def redacted(self) -> str:
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.sentinels)
        auth = "***@" if self.password else ""
        scheme = SENTINEL_SCHEMES[1] if self.ssl else SENTINEL_SCHEMES[0]
        return f"{scheme}://{auth}{hosts}/{self.service_name}/{self.db}"


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SENTINEL_SCHEMES


def _host_port(text: str, url: str) -> tuple[str, int]:
    if text.startswith("["):  # [v6]:port
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if not host:
        raise ValueError(f"TREX_REDIS_URL {redact(url)!r}: a sentinel without a host")
    try:
        return host, int(port) if port else DEFAULT_SENTINEL_PORT
    except ValueError:
        raise ValueError(f"TREX_REDIS_URL {redact(url)!r}: bad sentinel port {port!r}") from None


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse ``redis+sentinel://...``; a ValueError names what is wrong (never the password)."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in SENTINEL_SCHEMES:
        raise ValueError(f"not a Sentinel URL: {redact(url)!r}")
    # urlsplit cannot take a comma-separated host list with ports: split by hand.
    netloc, _, tail = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, sep, pw = userinfo.partition(":")
        username, password = unquote(user) or None, (unquote(pw) if sep else None)
    sentinels = tuple(_host_port(h.strip(), url) for h in hosts.split(",") if h.strip())
    if not sentinels:
        raise ValueError(f"TREX_REDIS_URL {redact(url)!r}: no sentinel address")
    parts = urlsplit("x://h/" + tail)
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path:
        raise ValueError(f"TREX_REDIS_URL {redact(url)!r}: the service name is missing (…/service_name[/db])")
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"TREX_REDIS_URL {redact(url)!r}: the path must be /service_name[/db]")
    options: dict[str, float] = {}
    extra: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in _FLOAT_OPTIONS:
            options[key] = float(value)
        elif key in _SENTINEL_OPTIONS:
            extra[key] = value
        else:
            raise ValueError(f"TREX_REDIS_URL {redact(url)!r}: unknown option {key!r} "
                             f"(known: {', '.join(_FLOAT_OPTIONS + _SENTINEL_OPTIONS)})")
    return SentinelUrl(sentinels=sentinels, service_name=path[0], db=int(path[1]) if len(path) == 2 else 0,
                       username=username, password=password, ssl=scheme.lower() == SENTINEL_SCHEMES[1],
                       sentinel_username=extra.get("sentinel_username") or None,
                       sentinel_password=extra.get("sentinel_password") or None, options=options)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = userinfo.split(":", 1)[0] + ":***@" + hosts
    return f"{scheme}://{netloc}{slash}{tail.split('?', 1)[0]}"


def _sentinel_args(spec: SentinelUrl, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(connection kwargs for the Redis servers, kwargs for the sentinel connections)."""
    conn = {**kwargs, **spec.options, "db": spec.db}
    if spec.username:
        conn["username"] = spec.username
    if spec.password:
        conn["password"] = spec.password
    if spec.ssl:
        conn["ssl"] = True
    # The sentinels answer small commands: same timeouts, their own credentials, no decoding rules.
    sentinel = {k: v for k, v in conn.items() if k.startswith("socket_")}
    if spec.ssl:
        sentinel["ssl"] = True
    if spec.sentinel_username:
        sentinel["username"] = spec.sentinel_username
    if spec.sentinel_password:
        sentinel["password"] = spec.sentinel_password
    return conn, sentinel


def async_client(url: str, **kwargs: Any) -> aioredis.Redis:
    """A ``redis.asyncio.Redis`` for any URL form above; ``kwargs`` as for ``Redis.from_url``."""
    return _client(url, kwargs, aioredis.Redis, AsyncSentinel)


def sync_client(url: str, **kwargs: Any) -> redis.Redis:
    """The blocking twin of :func:`async_client` (the front proxy's sync loop, tools)."""
    return _client(url, kwargs, redis.Redis, SyncSentinel)


def _client(url: str, kwargs: dict[str, Any], redis_class: type[_R],
            sentinel_class: type[AsyncSentinel] | type[SyncSentinel]) -> _R:
    # redis-py's asyncio and blocking Redis and Sentinel classes take the same arguments, so the
    # two clients are built by one reading of the URL and cannot drift apart.
    if not is_sentinel_url(url):
        return redis_class.from_url(url, **kwargs)
    spec = parse_sentinel_url(url)
    conn, sentinel_kwargs = _sentinel_args(spec, kwargs)
    ssl = conn.pop("ssl", False)
    manager = sentinel_class(list(spec.sentinels), sentinel_kwargs=sentinel_kwargs)
    return manager.master_for(spec.service_name, redis_class=redis_class, ssl=ssl, **conn)


async def close_async(client: aioredis.Redis) -> None:
    """Close ``client`` and, for a Sentinel-managed one, its connections to the sentinels (redis-py
    leaves those to the caller)."""
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    await client.aclose()
    if manager is not None:
        await manager.aclose()
