"""The latency budget of one request at one connection: a gateway started like `trex-serve up`
(every risk control on the key, logs and metrics on) with the stage timers of
deployments/stage_probe.py switched on, wrk -c1 at each entry point (the front proxy, an
ingress replica's data server, Serve's HAProxy, the replica's Serve port, the upstream), then each
stage's p50 as the replicas saw it.

    .venv/bin/python scripts/bench_stages.py [--duration 8]

The timers cost a few microseconds per stage; compare entry points within one run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_gateway import BODY, start_mock, write_bench_catalog, wrk  # noqa: E402
from trex_serve.local.embedded import free_port, free_ports  # noqa: E402

RISK = {"allowed_ips": ["127.0.0.0/8", "::1/128"], "daily_spend_cap": 1e6, "monthly_spend_cap": 1e7,
        "max_output_tokens": 4096, "max_prompt_tokens": 100000, "velocity": {"window_s": 60, "max_credits": 1e6}}


def replica_ports(home: Path, tag: str) -> list[int]:
    """The listening ports of this gateway's replicas named ``tag`` (found by their TREX_HOME)."""
    pids = []
    for pid in subprocess.run(["pgrep", "-f", tag], capture_output=True, text=True).stdout.split():
        try:
            if f"TREX_HOME={home}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                pids.append(pid)
        except OSError:
            continue
    out = []
    for line in subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout.splitlines():
        if any(f"pid={pid}," in line for pid in pids):
            out.append(int(line.split()[3].rsplit(":", 1)[1]))
    return out


def data_server(home: Path) -> tuple[str, dict[str, str]] | None:
    """One ingress replica's data server and the headers the front proxy adds (web/data_server.py)."""
    import redis

    from trex_serve.web.data_endpoints import live_endpoints
    from trex_serve.web.front_id import AUTH_HEADER, front_secret

    gateway = json.loads((home / "gateway.json").read_text())
    live = live_endpoints(redis.Redis.from_url(gateway["redis_url"]))
    if not live:
        return None
    secret = front_secret((home / "secret_key").read_text().strip())
    return live[0], {AUTH_HEADER: secret, "X-Forwarded-For": "127.0.0.1"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=8)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="trex-stages-"))
    probe = home / "stages"
    mock_port, http_port, serve_port = free_ports(3)
    mock = start_mock(mock_port)
    catalog = write_bench_catalog(home, mock_port, timeout_s=30)
    env = {**os.environ, "TREX_HOME": str(home), "TREX_CATALOG": str(catalog), "TREX_HTTP_PORT": str(http_port),
           "TREX_ADMIN_TOKEN": "bench", "TREX_STAGE_PROBE": str(probe)}
    cli = [sys.executable, "-m", "trex_serve.local.cli"]
    rows: dict[str, dict] = {}
    try:
        up = subprocess.run([*cli, "up", "--detach", "--ray-port", str(free_port()), "--num-cpus", "2",
                             "--serve-port", str(serve_port)], env=env, capture_output=True, text=True)
        if up.returncode:
            sys.exit(up.stdout + up.stderr)
        base = f"http://127.0.0.1:{http_port}"
        admin = httpx.Client(base_url=f"{base}/admin/v1", headers={"Authorization": "Bearer bench"}, timeout=30)
        acc = admin.post("/accounts", json={"name": "bench", "plan": "bench"}).json()
        key = admin.post(f"/accounts/{acc['id']}/keys", json={"name": "risky", "risk": RISK}).json()["key"]
        for _ in range(100):
            httpx.post(f"{base}/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"})
        url = "/v1/chat/completions"
        rows["upstream direct"] = wrk(f"http://127.0.0.1:{mock_port}{url}", 1, args.duration, BODY, None)
        for f in glob.glob(str(probe / "*.json")):
            os.unlink(f)
        time.sleep(2.5)
        rows["through the front proxy (as clients)"] = wrk(f"{base}{url}", 1, args.duration, BODY, key)
        time.sleep(2.5)
        stages = {}
        for f in glob.glob(str(probe / "*.json")):
            stages.update(json.loads(Path(f).read_text()))
        data = data_server(home)
        if data:
            rows["at the replica's data server (front's headers)"] = wrk(f"http://{data[0]}{url}", 1, args.duration,
                                                                         BODY, key, data[1])
        rows["at Serve's HAProxy"] = wrk(f"http://127.0.0.1:{serve_port}{url}", 1, args.duration, BODY, key)
        low, high = json.loads((home / "gateway.json").read_text())["ingress_ports"]
        ingress = [p for p in replica_ports(home, "ServeReplica:trex:Ingress") if low <= p <= high]
        if ingress:
            rows["at the ingress replica's Serve port (uvicorn)"] = wrk(f"http://127.0.0.1:{ingress[0]}{url}", 1,
                                                                       args.duration, BODY, key)
    finally:
        subprocess.run([*cli, "down"], env=env, capture_output=True)
        mock.kill()
    print(f"\n{'entry point (wrk -c1)':40} {'req/s':>7} {'p50 ms':>7} {'non-2xx':>8}")
    for name, r in rows.items():
        print(f"{name:40} {r['rps']:7.0f} {r['p50']:7.2f} {r['non2xx']:8d} {r['socket_errors']}")
    print(f"\n{'stage (inside the replicas, front-proxy run)':48} {'n':>6} {'p50 ms':>7} {'mean ms':>8}")
    for name, s in sorted(stages.items(), key=lambda kv: -kv[1]["p50_ms"]):
        print(f"{name:48} {s['n']:6d} {s['p50_ms']:7.3f} {s['mean_ms']:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
