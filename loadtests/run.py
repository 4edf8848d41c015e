"""Headless Locust harness with asserted thresholds.

    python -m loadtests.run SUITE --users N --spawn-rate R --run-time 10s \\
        --host http://127.0.0.1:8000 --admin-token T --catalog config/catalog.yaml

SUITE is one of: steady, routes, fallback, limits, billing, replica_loss, keys, node_loss, redis_failover,
conversations (see loadtests/README.md).
The harness prepares what the suite needs through the operator API (an account of its own, keys with
limits, credits), runs Locust programmatically (no web UI), switches mock-upstream faults mid-run where
the suite says so, prints req/s, p50/p95/p99 and TTFB, then checks the suite's assertions: exit 0 when
all hold, 1 with one line per miss otherwise (2 on a setup error).

This module is the runner; the suites' setup and assertions are in suites.py and fault_suites.py
(redis_failover.py and conversations.py for theirs), what they share in harness.py, and the printed
numbers in report.py."""

from __future__ import annotations

import gevent.monkey  # noqa: I001  (Locust patches on import; make it explicit and first)

gevent.monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
from locust.env import Environment  # noqa: E402

from loadtests import harness  # noqa: E402
from loadtests.common import RECORDER  # noqa: E402
from loadtests.fault_suites import Keys, NodeLoss, ReplicaLoss  # noqa: E402
from loadtests.harness import INFLIGHT, STOP, Ctx, Suite  # noqa: E402
from loadtests.report import report  # noqa: E402
from loadtests.suites import Billing, Fallback, Limits, Routes, Steady  # noqa: E402

SUITES = ("steady", "routes", "fallback", "limits", "billing", "replica_loss", "keys", "node_loss", "redis_failover",
          "conversations")


def parse_duration(text: str) -> float:
    text = text.strip().lower()
    total, num = 0.0, ""
    for ch in text:
        if ch.isdigit() or ch == ".":
            num += ch
        elif ch in "hms":
            total += float(num or 0) * {"h": 3600, "m": 60, "s": 1}[ch]
            num = ""
        else:
            raise argparse.ArgumentTypeError(f"bad duration {text!r} (use 10s, 1m30s)")
    return total + float(num or 0)


SUITE_CLASSES: dict[str, type[Suite]] = {"steady": Steady, "routes": Routes, "fallback": Fallback, "limits": Limits,
                                          "billing": Billing, "replica_loss": ReplicaLoss, "keys": Keys,
                                          "node_loss": NodeLoss}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=SUITES)
    p.add_argument("--users", type=int, default=10)
    p.add_argument("--spawn-rate", type=float, default=10)
    p.add_argument("--run-time", type=parse_duration, default=parse_duration("30s"))
    p.add_argument("--host", default=os.environ.get("TREX_LOADTEST_HOST", "http://127.0.0.1:8000"))
    p.add_argument("--admin-token", default=os.environ.get("TREX_ADMIN_TOKEN"))
    p.add_argument("--catalog", default=os.environ.get("TREX_CATALOG"),
                   help="the gateway's catalog YAML (mock URLs, candidate chains, prices)")
    p.add_argument("--plan", default="free", help="plan of the accounts the suite creates")
    p.add_argument("--standard-model", default=None)
    p.add_argument("--premium-model", default=None)
    p.add_argument("--app-name", default="trex", help="Serve application name (replica_loss)")
    p.add_argument("--request-timeout", type=float, default=15.0, help="client bound per request (s)")
    p.add_argument("--p99-ms", type=float, default=5000.0, help="steady: p99 latency bound")
    p.add_argument("--hang-rate", type=float, default=0.03, help="fallback: hang rate of the primary")
    p.add_argument("--recovery-timeout", type=float, default=45.0,
                   help="fallback/replica_loss: how long the primary may take to serve again (s)")
    p.add_argument("--rpm", type=int, default=5, help="limits: RPM of each rate-limited key")
    p.add_argument("--rpm-keys", type=int, default=2)
    p.add_argument("--conc-keys", type=int, default=2, help="limits: keys with concurrency 1, 2, 2...")
    p.add_argument("--limits-latency-ms", type=float, default=150.0)
    p.add_argument("--leak-grace", type=float, default=2.0, help="limits: seconds a slot may take to free")
    p.add_argument("--credits", type=float, default=1000.0, help="billing: credits granted")
    p.add_argument("--error-rate", type=float, default=0.3, help="billing: primary error rate")
    p.add_argument("--backup-error-rate", type=float, default=0.1, help="billing: backup error rate")
    p.add_argument("--settle-timeout", type=float, default=20.0)
    p.add_argument("--hang-bound", type=float, default=10.0, help="replica_loss: no request over this (s)")
    p.add_argument("--key-accounts", type=int, default=12, help="keys: accounts (each sticks to one key)")
    p.add_argument("--hot-key", default=None, help="keys: id of the key switched to 429 (default the first)")
    p.add_argument("--kill-raylet-pid", type=int, default=0, help="node_loss: the raylet of the node to lose")
    p.add_argument("--node-loss-latency-ms", type=int, default=300,
                   help="node_loss, redis_failover: upstream latency, so requests are in flight when it goes")
    p.add_argument("--redis-fault-pid", type=int, default=0,
                   help="redis_failover: a `python -m trex_serve.local.sentinel_set` process")
    p.add_argument("--turns", type=int, default=6, help="conversations: turns of each chained conversation")
    p.add_argument("--cut-replication-s", type=float, default=0.0,
                   help="redis_failover: cut replication this long before the primary is killed")
    return p


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.admin_token or not args.catalog:
        print("--admin-token and --catalog (or TREX_ADMIN_TOKEN / TREX_CATALOG) are required", file=sys.stderr)
        return 2
    args.host = args.host.rstrip("/")
    STOP["now"] = False
    INFLIGHT["n"] = 0
    RECORDER.clear()
    ctx = Ctx(args)
    if args.suite == "redis_failover":  # its own module, handed this harness (see its docstring)
        from loadtests.redis_failover import suite_class

        SUITE_CLASSES["redis_failover"] = suite_class(harness)
    if args.suite == "conversations":
        from loadtests.conversations import suite_class as conversations

        SUITE_CLASSES["conversations"] = conversations(harness)
    suite = SUITE_CLASSES[args.suite](ctx)
    print(f"suite {args.suite}: {args.users} users, spawn rate {args.spawn_rate}/s, {args.run_time:g} s against "
          f"{args.host} (standard {ctx.standard}: {ctx.primary} -> {ctx.backup}; premium {ctx.premium})", flush=True)
    try:
        user = suite.prepare()
        suite.before_start()
        env = Environment(user_classes=[user], host=args.host)
        runner = env.create_local_runner()
        ctx.mark("start")
        runner.start(args.users, spawn_rate=args.spawn_rate)
        t0 = time.time()
        while True:
            elapsed = time.time() - t0
            suite.during(elapsed)
            if suite.done(elapsed):
                break
            gevent.sleep(0.1)
        # Let every in-flight request finish (the suites count what was answered), then stop.
        STOP["now"] = True
        ctx.mark("stopping")
        deadline = time.time() + args.request_timeout + 5
        while INFLIGHT["n"] > 0 and time.time() < deadline:
            gevent.sleep(0.05)
        duration = time.time() - t0
        ctx.extra["duration"] = duration
        runner.quit()
        recs = list(RECORDER.records)
        suite.check(recs)
        report(ctx, env, recs, duration)
    except Exception as err:
        print(f"SETUP/RUN ERROR in suite {args.suite}: {type(err).__name__}: {err}", file=sys.stderr)
        import traceback
        traceback.print_exc()
        return 2
    finally:
        suite.cleanup()
    if ctx.misses:
        print(f"\nFAIL {args.suite}: {len(ctx.misses)} threshold(s) missed")
        for m in ctx.misses:
            print(f"  - {m}")
        return 1
    print(f"\nPASS {args.suite}")
    return 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
