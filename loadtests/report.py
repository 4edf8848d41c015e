"""The numbers a suite prints after its run: req/s, latency and TTFB percentiles, statuses."""

from __future__ import annotations

from collections import Counter

from locust.env import Environment

from loadtests.common import Record, percentile
from loadtests.harness import Ctx


def report(ctx: Ctx, env: Environment, recs: list[Record], duration: float) -> None:
    total = env.stats.total
    lat = [r.latency_ms for r in recs]
    ttfb = [r.ttfb_ms for r in recs if r.ttfb_ms is not None and r.status == 200]
    statuses = Counter(str(r.status) if r.status else "no-answer" for r in recs)
    rps = len(recs) / max(duration, 1e-9)
    print(f"\n== {ctx.args.suite}: {len(recs)} requests in {duration:.1f} s = {rps:.1f} req/s"
          f" ({ctx.args.users} users); locust failures {total.num_failures}")
    print(f"   latency ms  p50 {percentile(lat, .5):.0f}  p95 {percentile(lat, .95):.0f}  "
          f"p99 {percentile(lat, .99):.0f}  max {max(lat, default=0):.0f}")
    print(f"   TTFB ms     p50 {percentile(ttfb, .5):.0f}  p95 {percentile(ttfb, .95):.0f}  "
          f"p99 {percentile(ttfb, .99):.0f}")
    print(f"   statuses {dict(statuses)}  providers {dict(Counter(r.provider for r in recs))}")
    for note in ctx.notes:
        print(f"   {note}")
