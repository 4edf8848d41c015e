"""TREX_REDIS_URL forms (admission/redis_urls.py): Sentinel URLs parsed as the Redis-Sentinel-Url
package defines them, clients of the right kind for every form, passwords never in messages."""

from __future__ import annotations

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import SentinelConnectionPool

from trex_serve.admission.lean_redis import LeanRedis
from trex_serve.admission.redis_urls import (
    async_client,
    is_sentinel_url,
    parse_sentinel_url,
    redact,
    sync_client,
)


def test_a_sentinel_url_names_its_sentinels_service_database_and_credentials():
    spec = parse_sentinel_url("redis+sentinel://app:s%40cret@s1:26380,s2,[::1]:26381/trex/3"
                              "?socket_timeout=0.5&sentinel_password=sp")
    assert spec.sentinels == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    assert (spec.service_name, spec.db, spec.username, spec.password) == ("trex", 3, "app", "s@cret")
    assert spec.sentinel_password == "sp" and spec.options == {"socket_timeout": 0.5} and not spec.ssl
    assert parse_sentinel_url("rediss+sentinel://h/svc").ssl
    assert parse_sentinel_url("redis+sentinel://:pw@h:1/svc").password == "pw"
    assert is_sentinel_url("REDIS+SENTINEL://h/s") and not is_sentinel_url("redis://h:6379/0")


@pytest.mark.parametrize("url, message", [
    ("redis+sentinel://u:topsecret@h:1", "the service name is missing"),
    ("redis+sentinel://u:topsecret@h:1/svc/notanumber", "the path must be"),
    ("redis+sentinel://u:topsecret@h:x/svc", "bad sentinel port"),
    ("redis+sentinel://u:topsecret@/svc", "no sentinel address"),
    ("redis+sentinel://u:topsecret@h/svc?retry=1", "unknown option 'retry'"),
])
def test_a_bad_sentinel_url_says_what_is_wrong_without_the_password(url, message):
    with pytest.raises(ValueError, match=message) as caught:
        parse_sentinel_url(url)
    assert "topsecret" not in str(caught.value)


def test_redact_hides_the_password_of_every_form():
    assert redact("redis://u:pw@h:6379/0") == "redis://u:***@h:6379/0"
    assert redact("redis+sentinel://:pw@a:1,b:2/svc/0?sentinel_password=x") == "redis+sentinel://:***@a:1,b:2/svc/0"
    assert redact("unix:///tmp/r.sock") == "unix:///tmp/r.sock"


def test_clients_follow_the_sentinels_and_the_lean_connection_asks_them_too():
    client = async_client("redis+sentinel://u:pw@127.0.0.1:26390,127.0.0.1:26391/trex/2", decode_responses=True)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "trex"
    assert (pool.connection_kwargs["db"], pool.connection_kwargs["password"]) == (2, "pw")
    assert [s.connection_pool.connection_kwargs["port"] for s in pool.sentinel_manager.sentinels] == [26390, 26391]
    lean = LeanRedis.for_client(client)
    assert lean is not None and lean.resolve is not None and (lean.db, lean.password) == (2, "pw")
    assert LeanRedis.for_client(async_client("rediss+sentinel://127.0.0.1:26390/trex")) is None, "TLS: redis-py"
    sync = sync_client("redis+sentinel://127.0.0.1:26390/trex")
    assert isinstance(sync, redis.Redis) and sync.connection_pool.service_name == "trex"
    assert isinstance(async_client("redis://127.0.0.1:6390/1"), aioredis.Redis)
