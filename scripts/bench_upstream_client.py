"""Why the pool chose aiohttp over httpx for upstreams (streams still use it; whole answers now go
over hop/upstream_client.py): the same requests, at the same concurrency, against
the same mock upstream, through aiohttp's pool and through httpx's own pool, in one run.

    .venv/bin/python scripts/bench_upstream_client.py [--requests 4000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_gateway import BODY, start_mock  # noqa: E402
from trex_serve.local.embedded import free_port  # noqa: E402


async def drive(send, total: int, concurrency: int) -> float:
    left = total

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await send()

    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return total / (time.perf_counter() - t0)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    port = free_port()
    mock = start_mock(port)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = orjson.dumps(BODY)
    headers = {"Content-Type": "application/json"}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024)) as session:
            async def via_aiohttp() -> None:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()

            await drive(via_aiohttp, 200, args.concurrency)
            a = await drive(via_aiohttp, args.requests, args.concurrency)
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1024)) as client:
            async def via_httpx() -> None:
                (await client.post(url, content=body, headers=headers)).read()

            await drive(via_httpx, 200, args.concurrency)
            h = await drive(via_httpx, args.requests, args.concurrency)
    finally:
        mock.kill()
    print(f"concurrency {args.concurrency}: aiohttp {a:,.0f} req/s, httpx {h:,.0f} req/s, ratio {a / h:.1f}x")


if __name__ == "__main__":
    asyncio.run(main())
