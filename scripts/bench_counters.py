"""Benchmark the counter store: one EVALSHA per call vs the group-commit batcher.

Each simulated request is one admission + one settlement (two Lua calls), credits-billed with an
RPM limit, a concurrency lease, a spend cap and velocity tracking: the heavy path. Prints script
calls per second and requests per second at each concurrency.

    .venv/bin/python scripts/bench_counters.py                 # starts its own Redis
    .venv/bin/python scripts/bench_counters.py --url redis://127.0.0.1:6379/0 --seconds 5
    .venv/bin/python scripts/bench_counters.py --replicas 2 --wait 0 1 2    # durable writes (WAIT)

``--replicas N`` starts a primary with N replicas behind three sentinels (local/sentinel_set.py) and
connects through its ``redis+sentinel://`` URL; ``--wait`` lists the TREX_REDIS_WAIT_REPLICAS
values to compare (redis_durability.py).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

from trex_serve.admission.counters import AdmitRequest, CounterStore, SettleRequest
from trex_serve.local.embedded import free_port, start_redis
from trex_serve.local.sentinel_set import SentinelSet
from trex_serve.redis_durability import Durability


async def run(url: str, group_commit: bool, concurrency: int, seconds: float, wait: int = 0,
              latencies: list[float] | None = None) -> tuple[int, float]:
    prefix = f"bench{uuid.uuid4().hex[:8]}:"
    store = CounterStore.from_url(url, prefix, group_commit=group_commit,
                                  durability=Durability.from_settings(wait, 1000, 10.0))
    await store.load_scripts()
    await store.ensure_balance("acct", 10**15)
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        key = f"key{w % 8}"
        while time.perf_counter() < stop:
            rid = uuid.uuid4().hex
            began = time.perf_counter()
            res = await store.admit(
                AdmitRequest(
                    rid,
                    key,
                    "acct",
                    billing="credits",
                    rpm=10**9,
                    tpm=10**12,
                    tokens_estimate=500,
                    concurrency=1000,
                    reserve_micro=1500,
                    key_daily_cap_micro=10**14,
                )
            )
            assert res.ok, res
            await store.settle(
                SettleRequest(
                    rid,
                    tokens_in=300,
                    tokens_out=100,
                    charge_micro=900,
                    velocity_window_s=60,
                    velocity_max_micro=10**14,
                )
            )
            if latencies is not None:
                latencies.append(time.perf_counter() - began)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*[worker(w) for w in range(concurrency)])
    elapsed = time.perf_counter() - t0
    # clean up the namespace
    async for k in store.client.scan_iter(match=prefix + "*", count=1000):
        await store.client.delete(k)
    await store.aclose()
    return done, elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="", help="Redis URL (default: start a private server)")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeat", type=int, default=3, help="alternate the modes N times, keep the best")
    parser.add_argument("--replicas", type=int, default=0, help="start a primary with N replicas behind sentinels")
    parser.add_argument("--wait", type=int, nargs="+", default=None,
                        help="TREX_REDIS_WAIT_REPLICAS values to compare (needs --replicas)")
    args = parser.parse_args()
    proc = None
    url = args.url
    if args.wait:
        sentinels = SentinelSet(Path(tempfile.mkdtemp(prefix="trex-bench-sentinels-")), replicas=args.replicas,
                                relay=False).start()
        try:
            await durable_table(sentinels.url(), args)
        finally:
            sentinels.stop()
        return
    if not url:
        port = free_port()
        proc = start_redis(port, Path(tempfile.mkdtemp(prefix="trex-bench-redis-")))
        url = f"redis://127.0.0.1:{port}/0"
    try:
        print(f"{'mode':<14}{'conc':>6}{'requests/s':>14}{'script calls/s':>18}   (best of {args.repeat})")
        for conc in args.concurrency:
            best = {False: 0.0, True: 0.0}
            for _ in range(args.repeat):  # alternate, so background load hits both modes alike
                for group in (False, True):
                    n, el = await run(url, group, conc, args.seconds)
                    best[group] = max(best[group], n / el)
            for group in (False, True):
                mode = "group-commit" if group else "direct"
                rate = best[group]
                print(f"{mode:<14}{conc:>6}{rate:>14,.0f}{2 * rate:>18,.0f}", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)


async def durable_table(url: str, args: argparse.Namespace) -> None:
    """Group commit, each WAIT setting in turn (alternated), requests/s and the latency of one
    admission + settlement (p50/p99 of the best run's requests)."""
    print(f"{'wait':<6}{'conc':>6}{'requests/s':>14}{'p50 ms':>10}{'p99 ms':>10}   (best of {args.repeat})")
    for conc in args.concurrency:
        best: dict[int, tuple[float, list[float]]] = {}
        for _ in range(args.repeat):
            for wait in args.wait:
                lat: list[float] = []
                n, el = await run(url, True, conc, args.seconds, wait, lat)
                if n / el > best.get(wait, (0.0, []))[0]:
                    best[wait] = (n / el, sorted(lat))
        for wait in args.wait:
            rate, lat = best[wait]
            p50, p99 = lat[len(lat) // 2] * 1000, lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
            print(f"{wait:<6}{conc:>6}{rate:>14,.0f}{p50:>10.3f}{p99:>10.3f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
