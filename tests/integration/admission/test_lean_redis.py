"""The counter scripts' lean Redis connection (lean_redis.py) against a real Redis: replies in
order and decoded like redis-py's, error replies in place, the URL's database, a dropped socket
replaced, a caller that gives up leaving the others' replies intact, TLS left to redis-py, and a
primary the sentinels no longer name left even while it still answers as one."""

from __future__ import annotations

import asyncio
import time
import uuid
from decimal import Decimal
from urllib.parse import urlparse

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from trex_serve.admission.lean_redis import LeanRedis, pack
from trex_serve.local.embedded import free_port, start_redis


def _db(url: str, db: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{db}"


@pytest.fixture
async def pair(redis_url):
    """A redis-py client on database 3 and the lean connection made from it."""
    client = aioredis.Redis.from_url(_db(redis_url, 3), decode_responses=True)
    lean = LeanRedis.for_client(client)
    assert lean is not None
    yield client, lean
    lean.close()
    await client.aclose()


def test_commands_are_packed_as_redis_py_packs_them():
    conn = Connection()
    for args in (("SET", "k", "v"), ("EVALSHA", "ab" * 20, 0, "p:", 12, -1, "0.8", ""), ("GET", "é"),
                 ("SET", b"\x00\xff", 1796373915.6652586), ("INCRBY", "k", 2**60), ("X", 1e-05, 0.1 + 0.2)):
        assert pack(args) == b"".join(conn.pack_command(*args))
    # A type hiredis's encoder refuses is written as its text, as before.
    assert pack(("SET", "k", Decimal("1.50"))) == pack(("SET", "k", "1.50"))


async def test_replies_come_back_in_order_decoded_with_errors_in_place(pair):
    client, lean = pair
    key = f"lean:{uuid.uuid4().hex}"
    replies = await lean.execute([("SET", key, "é"), ("GET", key), ("INCR", key), ("RPUSH", key + "l", 1, 2),
                                  ("LRANGE", key + "l", 0, -1)])
    assert replies[:2] == ["OK", "é"] and isinstance(replies[2], ResponseError)
    assert replies[3:] == [2, ["1", "2"]]
    assert lean.db == 3 and await client.get(key) == "é", "the URL's database"
    sent: list[bool] = []
    assert await lean.execute([("PING",)], lambda: sent.append(True)) == ["PONG"] and sent == [True]


async def test_a_dropped_socket_fails_the_calls_on_it_and_is_replaced(pair):
    client, lean = pair
    kill = ("CLIENT", "KILL", "SKIPME", "yes", "TYPE", "normal")
    waiting = asyncio.ensure_future(lean.execute([("BLPOP", f"none:{uuid.uuid4().hex}", "5")]))
    await asyncio.sleep(0.1)
    await client.execute_command(*kill)
    with pytest.raises(RedisConnectionError):
        await asyncio.wait_for(waiting, 2)
    assert await lean.execute([("PING",)]) == ["PONG"]
    await client.execute_command(*kill)  # dropped while idle: the next call does not notice
    await asyncio.sleep(0.1)
    assert await lean.execute([("PING",)]) == ["PONG"]


async def test_a_caller_that_gives_up_leaves_the_next_replies_in_step(pair):
    _, lean = pair
    slow = asyncio.ensure_future(lean.execute([("BLPOP", f"none:{uuid.uuid4().hex}", "0.3")]))
    await asyncio.sleep(0.05)
    slow.cancel()
    assert await lean.execute([("ECHO", "after")]) == ["after"]  # BLPOP's nil was read and dropped


def test_tls_urls_stay_on_redis_py():
    assert LeanRedis.for_client(aioredis.Redis.from_url("rediss://127.0.0.1:6390/0")) is None
    lean = LeanRedis.for_client(aioredis.Redis.from_url("unix:///tmp/r.sock?db=2"))
    assert lean is not None and (lean.path, lean.db, lean.encoding) == ("/tmp/r.sock", 2, None)


@pytest.fixture
def two_primaries(redis_url, tmp_path):
    """Ports of two Redis servers that both answer as the primary: what a gateway meets when the
    sentinels promote a replica while the old primary is still up (a partition, or a second
    failover that deposes the primary promoted a moment before)."""
    port = free_port()
    proc = start_redis(port, tmp_path / "second")
    yield urlparse(redis_url).port, port
    proc.kill()
    proc.wait(timeout=10)


def _sentinels(named: list[int]):
    async def resolve() -> tuple[str, int]:
        return "127.0.0.1", named[-1]
    return resolve


async def _server_port(lean: LeanRedis) -> int:
    (reply,) = await lean.execute([("CONFIG", "GET", "port")])
    return int(reply[1])


async def test_calls_leave_a_primary_the_sentinels_no_longer_name_while_it_still_answers(two_primaries):
    old, new = two_primaries
    named = [old]
    lean = LeanRedis(resolve=_sentinels(named), recheck_s=0.05)
    try:
        assert await _server_port(lean) == old
        named.append(new)  # the old primary stays up and keeps answering as a primary
        landed: list[int] = []
        deadline = time.monotonic() + 2
        while (not landed or landed[-1] != new) and time.monotonic() < deadline:
            try:
                landed.append(await _server_port(lean))
            except RedisConnectionError:  # the call in flight when the socket was dropped
                pass
            await asyncio.sleep(0.01)
        assert landed and landed[-1] == new, f"still writing to the deposed primary after 2 s: {landed[-5:]}"
        assert await _server_port(lean) == new
    finally:
        lean.close()


async def test_the_first_call_after_an_idle_spell_asks_the_sentinels_first(two_primaries):
    old, new = two_primaries
    named = [old]
    lean = LeanRedis(resolve=_sentinels(named), recheck_s=0.05)
    try:
        assert await _server_port(lean) == old
        named.append(new)
        await asyncio.sleep(0.2)  # idle: nothing asked the sentinels meanwhile
        assert lean.ready() is None, "a write without an await would go to the deposed primary"
        assert await _server_port(lean) == new
    finally:
        lean.close()
