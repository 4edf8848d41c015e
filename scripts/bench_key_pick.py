"""Cost of choosing a managed upstream key (one ``upkey_pick.lua`` call per request on a provider
with ``keys:``) next to a bare PING, sequentially, with a 2,000-entry window in the logs.

    .venv/bin/python scripts/bench_key_pick.py --url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import redis.asyncio as aioredis

from trex_serve.catalog import UpstreamKey
from trex_serve.routing.upstream_keys import KeyStore


async def main(url: str, n: int) -> None:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    prefix = f"benchkeys{uuid.uuid4().hex[:6]}:"
    store = KeyStore(client, prefix)
    plain = [UpstreamKey(env="A", id="a"), UpstreamKey(env="B", id="b"), UpstreamKey(env="C", id="c", weight=2)]
    budgeted = [UpstreamKey(env="A", id="a", rpm=10**6, tpm=10**9), UpstreamKey(env="B", id="b", rpm=10**6),
                UpstreamKey(env="C", id="c", weight=2, rpm=10**6)]
    try:
        for label, keys in (("no budgets", plain), ("rpm+tpm budgets", budgeted)):
            for i in range(200):
                await store.pick("p", keys, f"warm{i}{label}", 100)
            t0 = time.perf_counter()
            for i in range(n):
                await store.pick("p", keys, f"m{i}{label}", 100)
            pick_ms = (time.perf_counter() - t0) / n * 1000
            t0 = time.perf_counter()
            for _ in range(n):
                await client.ping()
            ping_ms = (time.perf_counter() - t0) / n * 1000
            print(f"{label}: pick {pick_ms:.3f} ms per call, PING {ping_ms:.3f} ms")
    finally:
        async for key in client.scan_iter(prefix + "*"):
            await client.delete(key)
        await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("-n", type=int, default=2000)
    args = parser.parse_args()
    asyncio.run(main(args.url, args.n))
