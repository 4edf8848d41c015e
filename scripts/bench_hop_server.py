"""CPU per request of the pool replica's hop server: aiohttp's web application (the server the pool
ran before issue 29) against the lean server (hop/lean_server.py), with the same handler, the same
upstream client and the same caller, in one process without Ray.

    .venv/bin/python scripts/bench_hop_server.py [--requests 6000] [--concurrency 32] [--rounds 3]

The caller is the ingress's own LeanClient; the upstream is the repo's mock (a separate process,
its CPU not counted). The figure is this process's CPU (caller + pool server + the pool's upstream
client) per request, so the difference between the rows is the server's. The rows alternate,
round after round, and the best of the rounds is kept for each, so a slow moment of the machine
falls on both alike. aiohttp's path reaches the same handler through a thin adapter (the hop's
whole answers only: the lean Request and Response are a few attributes each).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_gateway import BODY, start_mock, write_bench_catalog  # noqa: E402
from trex_serve.catalog import load_catalog  # noqa: E402
from trex_serve.hop import contract as hop  # noqa: E402
from trex_serve.hop.lean_client import LeanClient  # noqa: E402
from trex_serve.hop.lean_messages import Response  # noqa: E402
from trex_serve.hop.pool_server import PoolServer  # noqa: E402
from trex_serve.local.embedded import free_port  # noqa: E402

SECRET = "bench-secret"


class _AiohttpRequest:
    """What the handler reads of a request, filled from aiohttp's."""

    __slots__ = ("headers", "body", "oversize", "disconnected")

    def __init__(self, headers: object, body: bytes) -> None:
        self.headers, self.body, self.oversize, self.disconnected = headers, body, False, False


async def start_aiohttp(pool: PoolServer) -> tuple[web.AppRunner, int]:
    async def relay(request: web.Request) -> web.Response:
        answer = await pool.relay(_AiohttpRequest(request.headers, await request.read()))
        assert isinstance(answer, Response), "the benchmark sends whole (non-streamed) requests only"
        return web.Response(status=answer.status, body=answer.body, headers=answer.headers)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/relay", relay)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, reuse_address=True)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def drive(port: int, total: int, concurrency: int) -> tuple[float, float]:
    """(CPU microseconds per request, requests per second) of ``total`` hop requests."""
    client = LeanClient()
    body = orjson.dumps(BODY)
    left = total

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            headers = {hop.H_SECRET: SECRET, hop.H_REQUEST_ID: uuid.uuid4().hex, hop.H_PROVIDER: "bench",
                       hop.H_MODEL: "gpt-4o-mini", hop.H_API: "chat", hop.H_STREAM: "0",
                       hop.H_WANT_USAGE: "0", "Content-Type": "application/json"}
            status, _, _ = await client.post("127.0.0.1", port, "/relay", headers, body)
            assert status == 200, status

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    await client.close()
    return cpu / total * 1e6, total / wall


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=6000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    mock_port = free_port()
    mock = start_mock(mock_port)
    try:
        with tempfile.TemporaryDirectory() as home:
            catalog = load_catalog(write_bench_catalog(Path(home), mock_port, timeout_s=30))
            pool = PoolServer({p.name: p for p in catalog.providers}, SECRET)
            ports = {"lean": await pool.start()}
            runner, ports["aiohttp"] = await start_aiohttp(pool)
            try:
                for port in ports.values():  # warm up both, and the upstream connections
                    await drive(port, 1000, args.concurrency)
                results: dict[str, list[tuple[float, float]]] = {name: [] for name in ports}
                for round_ in range(args.rounds):
                    order = list(ports.items())
                    for name, port in order[::-1] if round_ % 2 else order:  # who goes first alternates
                        results[name].append(await drive(port, args.requests, args.concurrency))
            finally:
                await runner.cleanup()
                await pool.stop()
    finally:
        mock.kill()
    print(f"{args.requests} whole requests per run, {args.concurrency} at once, best of {args.rounds} "
          "alternating runs; CPU = this process (caller + pool server + upstream client)\n")
    print("| server | CPU µs/request (best) | all runs | req/s (best) |")
    print("|---|---:|---|---:|")
    best = {}
    for name, runs in results.items():
        best[name] = min(cpu for cpu, _ in runs)
        every = ", ".join(f"{cpu:.0f}" for cpu, _ in runs)
        print(f"| {name} | {best[name]:.0f} | {every} | {max(rps for _, rps in runs):,.0f} |")
    saved = best["aiohttp"] - best["lean"]
    print(f"\nlean saves {saved:.0f} µs of CPU per request ({saved / best['aiohttp']:.0%} of this process's)")


if __name__ == "__main__":
    asyncio.run(main())
