"""The counter scripts' lean Redis connection (lean_redis.py) against a real Redis: replies in
order and decoded like redis-py's, error replies in place, the URL's database, a dropped socket
replaced, a caller that gives up leaving the others' replies intact, TLS left to redis-py."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from trex_serve.admission.lean_redis import LeanRedis, pack


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
