"""CPU time per request of the two Python processes on the hot path, without Ray:

    .venv/bin/python scripts/bench_cpu.py [--duration 8] [--connections 32] [--rounds 3]

The ingress side (runtime, pipeline, the direct data server: web/data_server.py) runs in this
process; the pool server (hop/pool_server.py) runs in a process of its own, as a pool replica does;
a private Redis, SQLite, and the mock upstream in another process, as `trex-serve up` runs them.
wrk drives the data server with the front proxy's headers at one load, and the script prints each
process's CPU milliseconds per answered request (user + system, from the kernel's accounting).

Why beside bench_gateway.py: the full path's requests per second on two shared cores move by 20 %
from run to run with nothing changed, and Ray's own processes add their share; CPU per request of
one process moves much less, so a change of a few per cent in one process shows here first. Every
control is on the key (bench_gateway's `--risk` key). Nothing here is a test: it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from scripts.bench_gateway import BODY, RISK, start_mock, write_bench_catalog, wrk  # noqa: E402
from trex_serve.catalog import load_catalog  # noqa: E402
from trex_serve.gc_settings import settle_heap  # noqa: E402
from trex_serve.local.embedded import free_ports, port_open, redis_server_binary, start_redis  # noqa: E402
from trex_serve.settings import Settings  # noqa: E402


def serve_pool(catalog_path: str, port: int, secret: str, gc_mode: str) -> None:
    """The pool process: one PoolServer on uvloop, as in a pool replica, until killed."""
    import uvloop

    from trex_serve.hop.pool_server import PoolServer

    async def run() -> None:
        catalog = load_catalog(catalog_path)
        await PoolServer({p.name: p for p in catalog.providers}, secret).start("127.0.0.1", port)
        if gc_mode == "settled":
            settle_heap()
        await asyncio.Event().wait()

    uvloop.run(run())


class GcClock:
    """CPU seconds this process's thread spent in the garbage collector (gc.callbacks)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._began = 0.0
        gc.callbacks.append(self._tick)

    def _tick(self, phase: str, _info: dict) -> None:
        if phase == "start":
            self._began = time.thread_time()
        else:
            self.seconds += time.thread_time() - self._began


collector = GcClock()


def cpu_of(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def measure(args: argparse.Namespace, home: Path) -> list[tuple[float, float, float]]:
    from trex_serve.local.standalone import standalone_gateway
    from trex_serve.web.data_server import DataServer
    from trex_serve.web.front_id import AUTH_HEADER, front_secret

    mock_port, redis_port, pool_port = free_ports(3)
    mock = start_mock(mock_port)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    if args.redis_unix:  # Redis on a Unix socket instead of TCP loopback
        sock = home / "redis.sock"
        redis = subprocess.Popen([redis_server_binary(), "--port", "0", "--unixsocket", str(sock), "--save", "",
                                  "--appendonly", "no", "--dir", str(home)], stdout=subprocess.DEVNULL)
        while not sock.exists():
            await asyncio.sleep(0.05)
        redis_url = f"unix://{sock}?db=0"
    else:
        redis = start_redis(redis_port, home)
    catalog_path = write_bench_catalog(home, mock_port, timeout_s=30)
    secret = secrets.token_urlsafe(16)
    pool = subprocess.Popen([sys.executable, __file__, "--pool", str(catalog_path), str(pool_port), secret, args.gc])
    if args.batch_sched:
        for pid in (0, pool.pid):
            os.sched_setscheduler(pid, os.SCHED_BATCH, os.sched_param(0))
    settings = Settings(catalog_path=str(catalog_path), database_url=f"sqlite:///{home / 'trex.db'}",
                        redis_url=redis_url, admin_token="bench",
                        secret_key=secrets.token_urlsafe(32))
    try:
        while not port_open("127.0.0.1", pool_port):
            await asyncio.sleep(0.05)
        async with standalone_gateway(settings, load_catalog(catalog_path),
                                      pool=(("127.0.0.1", pool_port), secret)) as gw:
            admin = httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw/admin/v1",
                                      headers={"Authorization": "Bearer bench"})
            account = (await admin.post("/accounts", json={"name": "bench", "plan": "bench"})).json()
            key = (await admin.post(f"/accounts/{account['id']}/keys",
                                    json={"name": "risky", "risk": RISK})).json()["key"]

            async def ref():  # noqa: ANN202
                return gw.pipeline

            server = DataServer(ref)
            port = await server.start("127.0.0.1")
            if args.gc == "settled":
                settle_heap()  # as the Ingress deployment does once it has started
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            headers = {AUTH_HEADER: front_secret(settings.secret_key), "X-Forwarded-For": "127.0.0.1"}
            rows = []
            # wrk runs in a thread so that this process's loop keeps serving while it waits.
            await asyncio.to_thread(wrk, url, args.connections, 3, BODY, key, headers)  # warm-up
            for _ in range(args.rounds):
                before = (time.process_time(), cpu_of(pool.pid))
                gc_before = collector.seconds
                result = await asyncio.to_thread(wrk, url, args.connections, args.duration, BODY, key, headers)
                served = result["rps"] * args.duration
                ingress = (time.process_time() - before[0]) / served * 1000
                pool_ms = (cpu_of(pool.pid) - before[1]) / served * 1000
                assert result["non2xx"] == 0, result
                gc_ms = (collector.seconds - gc_before) / served * 1000
                rows.append((result["rps"], ingress, pool_ms, gc_ms))
                print(f"  {result['rps']:7.0f} req/s  ingress {ingress:.3f} ms (of which GC {gc_ms:.3f})  "
                      f"pool {pool_ms:.3f} ms CPU/request", flush=True)
            if args.profile:
                await profile_round(args, url, key, headers)
            await server.stop()
            await admin.aclose()
    finally:
        for proc in (pool, mock, redis):
            proc.kill()
            proc.wait()
    return rows


async def profile_round(args: argparse.Namespace, url: str, key: str, headers: dict[str, str]) -> None:
    """One more round under cProfile (this process's loop only): the functions that take the
    ingress's time, with their calls per request. cProfile slows every call, so its times are
    shares, not figures to compare with the rounds above."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    result = await asyncio.to_thread(wrk, url, args.connections, args.duration, BODY, key, headers)
    prof.disable()
    served = result["rps"] * args.duration
    prof.dump_stats(args.profile)
    stats = pstats.Stats(prof)
    calls = sum(v[1] for v in stats.stats.values())  # type: ignore[attr-defined]
    print(f"\nprofiled round: {result['rps']:.0f} req/s, {calls / served:.0f} Python calls per request; "
          f"the top functions by own time (pstats in {args.profile}):")
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:args.profile_top]  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    for (file, line, name), (_cc, nc, tt, _ct, _callers) in rows:
        where = f"{Path(file).name}:{line}" if line else file
        print(f"  {tt / total * 100:5.1f} %  {nc / served:6.1f}/req  {name}  ({where})")
    print("our functions by time including callees (coroutines count each resumption as a call):")
    ours = [kv for kv in stats.stats.items() if "trex_serve" in kv[0][0]]  # type: ignore[attr-defined]
    for (file, line, name), (_cc, nc, _tt, ct, _callers) in sorted(ours, key=lambda kv: -kv[1][3])[:args.profile_top]:
        print(f"  {ct / total * 100:5.1f} %  {nc / served:6.1f}/req  {name}  ({Path(file).name}:{line})")


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--pool":
        serve_pool(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gc", choices=("settled", "default"), default="settled",
                    help="settled: gc_settings.settle_heap() in both processes, as the deployments do")
    ap.add_argument("--batch-sched", action="store_true", help="the two Python processes under SCHED_BATCH")
    ap.add_argument("--redis-unix", action="store_true", help="Redis on a Unix socket, not TCP loopback")
    ap.add_argument("--profile", metavar="FILE", help="one more round under cProfile; pstats written to FILE")
    ap.add_argument("--profile-top", type=int, default=40)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is required: apt-get install wrk")
    import uvloop

    home = Path(tempfile.mkdtemp(prefix="trex-bench-cpu-"))
    os.environ["TREX_HOME"] = str(home)
    rows = uvloop.run(measure(args, home))
    best = min(rows, key=lambda r: r[1] + r[2])
    print(f"\nc={args.connections}, {args.rounds} rounds of {args.duration} s; median of the rounds:")
    for name, i in (("req/s", 0), ("ingress CPU ms/request", 1), ("pool CPU ms/request", 2),
                    ("ingress GC ms/request", 3)):
        values = sorted(r[i] for r in rows)
        print(f"  {name:24} {values[len(values) // 2]:.3f}   (best round: {best[i]:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
