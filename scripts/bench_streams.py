"""Many concurrent open streams: N streams opened over a ramp, each paced at one chunk per second by
the mock upstream, against the upstream directly and through the gateway, in one run, from one
aiohttp client process. Reports how many completed, time to first byte p50/p90/p99, the TTFB the
gateway adds, and how many streams were open at once at the peak.

    .venv/bin/python scripts/bench_streams.py [--streams 1000] [--ramp 10] [--chunks 15]

The defaults hold all 1,000 open at once: opened 100 a second for 10 s, each lasting 15 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_gateway import start_mock, write_bench_catalog  # noqa: E402
from trex_serve.local.embedded import free_port, free_ports  # noqa: E402

OPEN = {"now": 0, "peak": 0}


async def one(session: aiohttp.ClientSession, url: str, key: str | None, delay: float) -> tuple[bool, float]:
    await asyncio.sleep(delay)
    OPEN["now"] += 1
    OPEN["peak"] = max(OPEN["peak"], OPEN["now"])
    try:
        return await _one(session, url, key)
    finally:
        OPEN["now"] -= 1


async def _one(session: aiohttp.ClientSession, url: str, key: str | None) -> tuple[bool, float]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    # The mock answers with as many chunks as its reply has words (at most --chunks): a long prompt.
    body = orjson.dumps({"model": "gpt-4o-mini", "stream": True,
                         "messages": [{"role": "user", "content": "stream " * 40}]})
    t0 = time.perf_counter()
    ttfb = None
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            if resp.status != 200:
                return False, float("nan")
            async for chunk in resp.content.iter_any():
                if ttfb is None and b"data:" in chunk:
                    ttfb = (time.perf_counter() - t0) * 1000
                if b"[DONE]" in chunk:
                    return True, ttfb or float("nan")
    except (aiohttp.ClientError, TimeoutError):
        return False, float("nan")
    return False, ttfb or float("nan")


async def run(url: str, key: str | None, streams: int, ramp: float) -> dict:
    OPEN.update(now=0, peak=0)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        results = await asyncio.gather(*[one(session, url, key, ramp * i / streams) for i in range(streams)])
    ttfbs = sorted(t for ok, t in results if ok and t == t)
    done = sum(1 for ok, _ in results if ok)
    q = statistics.quantiles(ttfbs, n=100) if len(ttfbs) >= 100 else [float("nan")] * 99
    return {"completed": done, "ttfb_p50": statistics.median(ttfbs) if ttfbs else float("nan"), "ttfb_p90": q[89],
            "ttfb_p99": q[98], "peak_open": OPEN["peak"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--ramp", type=float, default=10.0)
    ap.add_argument("--chunks", type=int, default=15)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="trex-bench-streams-"))
    mock_port, http_port = free_ports(2)
    mock = start_mock(mock_port)
    httpx.post(f"http://127.0.0.1:{mock_port}/_control", json={"token_interval_ms": 1000,
                                                                  "stream_chunks": args.chunks})
    catalog = write_bench_catalog(home, mock_port, timeout_s=60)
    env = {**os.environ, "TREX_HOME": str(home), "TREX_CATALOG": str(catalog), "TREX_HTTP_PORT": str(http_port),
           "TREX_ADMIN_TOKEN": "bench"}
    cli = [sys.executable, "-m", "trex_serve.local.cli"]
    try:
        up = subprocess.run([*cli, "up", "--detach", "--ray-port", str(free_port()), "--num-cpus", "2"], env=env,
                            capture_output=True, text=True)
        if up.returncode != 0:
            sys.exit(up.stdout + up.stderr)
        base = f"http://127.0.0.1:{http_port}"
        admin = httpx.Client(base_url=f"{base}/admin/v1", headers={"Authorization": "Bearer bench"}, timeout=30)
        acc = admin.post("/accounts", json={"name": "bench", "plan": "bench"}).json()
        key = admin.post(f"/accounts/{acc['id']}/keys", json={}).json()["key"]
        direct = asyncio.run(run(f"http://127.0.0.1:{mock_port}/v1/chat/completions", None, args.streams, args.ramp))
        gateway = asyncio.run(run(f"{base}/v1/chat/completions", key, args.streams, args.ramp))
    finally:
        subprocess.run([*cli, "down"], env=env, capture_output=True)
        mock.kill()
    print(f"\n{args.streams} streams opened over {args.ramp:g} s, {args.chunks} chunks at 1/s each")
    for name, r in (("upstream direct", direct), ("through the gateway", gateway)):
        print(f"{name:22} completed {r['completed']:5d}  open at once {r['peak_open']:5d}  "
              f"TTFB p50 {r['ttfb_p50']:8.1f} ms  p90 {r['ttfb_p90']:8.1f} ms  p99 {r['ttfb_p99']:8.1f} ms")
    print(f"added TTFB p50: {gateway['ttfb_p50'] - direct['ttfb_p50']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
