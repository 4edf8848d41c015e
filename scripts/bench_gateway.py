"""Side-by-side throughput and latency, in one run on this machine, against one fast mock upstream:
the upstream directly (the limit) and Trex Serve's full path (auth, admission, routing, one relay
hop, settlement, log), non-streaming and streaming, at 1 and 32 connections; optionally the same
gateway with every risk control enabled on the key, LiteLLM's proxy when it is installed, and
Portkey's gateway (one Node process) when `--portkey-dir` names a folder holding it, and
TensorZero's Rust gateway when `--tensorzero-python` names a Python with `tensorzero` installed:

    .venv/bin/python scripts/bench_gateway.py [--duration 10] [--risk] [--litellm] \
        [--portkey-dir /tmp/portkey] \\   # npm install @portkey-ai/gateway there first
        [--tensorzero-python /tmp/tz/bin/python]   # python -m venv /tmp/tz; /tmp/tz/bin/pip install tensorzero

Needs `wrk` (Debian package `wrk`). Prints a table and the ratios; nothing here is a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_anchors import start_tensorzero  # noqa: E402
from trex_serve.local.embedded import free_port, free_ports, port_open  # noqa: E402

WARMUP_S = 5
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "benchmark"}]}
# Every risk control on the key (`--risk`): address allow-list, spend caps, ceilings, velocity guard.
RISK = {"allowed_ips": ["127.0.0.0/8", "::1/128"], "daily_spend_cap": 1e6, "monthly_spend_cap": 1e7,
        "max_output_tokens": 4096, "max_prompt_tokens": 100000, "velocity": {"window_s": 60, "max_credits": 1e6}}


def wrk(url: str, connections: int, duration: int, body: dict, key: str | None,
        extra_headers: dict[str, str] | None = None) -> dict:
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    headers = 'wrk.headers["Content-Type"] = "application/json"\n'
    if key:
        headers += f'wrk.headers["Authorization"] = "Bearer {key}"\n'
    for name, value in (extra_headers or {}).items():
        headers += f'wrk.headers["{name}"] = "{value}"\n'
    script.write(f'wrk.method = "POST"\nwrk.body = [[{json.dumps(body)}]]\n{headers}')
    script.close()
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", script.name, url],
                         capture_output=True, text=True).stdout
    os.unlink(script.name)

    def ms(label: str) -> float:
        m = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", out)
        if not m:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": float(rps.group(1)) if rps else 0.0, "p50": ms("50"), "p99": ms("99"),
            "non2xx": int(non2xx.group(1)) if non2xx else 0, "socket_errors": errors.group(1) if errors else ""}


def start_mock(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "trex_serve.local.mock_upstream", "--port", str(port),
                             "--name", "bench"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not port_open("127.0.0.1", port):
        time.sleep(0.05)
    return proc


def write_bench_catalog(home: Path, mock_port: int, timeout_s: int, pool_replicas: int = 1) -> Path:
    """One provider on the mock, one model, a plan no benchmark can exhaust (shared by the bench scripts)."""
    catalog = home / "catalog.yaml"
    catalog.write_text(f"""
providers:
  - {{name: bench, base_url: "http://127.0.0.1:{mock_port}/v1", format: openai, auth: none, timeout_s: {timeout_s},
     pool: {{min_replicas: {pool_replicas}, max_replicas: {pool_replicas}}}}}
models:
  - id: gpt-4o-mini
    candidates: [{{provider: bench, model: gpt-4o-mini}}]
smart_auto: [gpt-4o-mini]
plans:
  - {{name: bench, rpm: 100000000, tpm: 10000000000, concurrency: 100000, burst_concurrency: 100000,
     daily_quota: {{}}, premium: true}}
""")
    return catalog


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--ingress-replicas", type=int, default=1)
    ap.add_argument("--pool-replicas", type=int, default=1)
    ap.add_argument("--skip-stream", action="store_true")
    ap.add_argument("--risk", action="store_true", help="also run with every risk control enabled on the key")
    ap.add_argument("--litellm", action="store_true", help="also run LiteLLM's proxy (pip install 'litellm[proxy]')")
    ap.add_argument("--litellm-bin", default=shutil.which("litellm") or "litellm",
                    help="the litellm executable (e.g. from a separate venv, its pins clash with ours)")
    ap.add_argument("--portkey-dir", type=Path, default=None,
                    help="a folder where `npm install @portkey-ai/gateway` was run: Portkey runs in the same run")
    ap.add_argument("--tensorzero-python", default=None,
                    help="a Python with `pip install tensorzero` (its own venv): TensorZero runs in the same run")
    ap.add_argument("--serve-path", action="store_true",
                    help="also measure the gateway's hot route through Serve's port (the path before the "
                         "direct data servers: they are put in maintenance for that row)")
    ap.add_argument("--cpu", action="store_true",
                    help="print each process's CPU per request during the gateway's row at 32 connections")
    ap.add_argument("--gateway-only", action="store_true",
                    help="only the rows the comparison needs (skip the plain key's rows when --risk is on)")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is required: apt-get install wrk")
    home = Path(tempfile.mkdtemp(prefix="trex-bench-"))
    load_before = os.getloadavg()
    mock_port, http_port = free_ports(2)
    mock = start_mock(mock_port)
    catalog = write_bench_catalog(home, mock_port, timeout_s=30, pool_replicas=args.pool_replicas)
    env = {**os.environ, "TREX_HOME": str(home), "TREX_CATALOG": str(catalog), "TREX_HTTP_PORT": str(http_port),
           "TREX_ADMIN_TOKEN": "bench", "TREX_INGRESS_REPLICAS": str(args.ingress_replicas)}
    cli = [sys.executable, "-m", "trex_serve.local.cli"]
    results: dict[str, dict] = {}
    cpu_note = ""
    portkey = start_portkey(args.portkey_dir, mock_port) if args.portkey_dir else None
    tz = start_tensorzero(args.tensorzero_python, mock_port, BODY) if args.tensorzero_python else None
    try:
        up = subprocess.run([*cli, "up", "--detach", "--ray-port", str(free_port()), "--num-cpus", "2"], env=env,
                            capture_output=True, text=True)
        if up.returncode != 0:
            sys.exit(up.stdout + up.stderr)
        base = f"http://127.0.0.1:{http_port}"
        admin = httpx.Client(base_url=f"{base}/admin/v1", headers={"Authorization": "Bearer bench"}, timeout=30)
        acc = admin.post("/accounts", json={"name": "bench", "plan": "bench"}).json()
        key = admin.post(f"/accounts/{acc['id']}/keys", json={"name": "bench"}).json()["key"]
        risky = None
        if args.risk:
            risky = admin.post(f"/accounts/{acc['id']}/keys", json={"name": "risky", "risk": RISK}).json()["key"]
        for _ in range(50):  # warm every connection pool on the path
            httpx.post(f"{base}/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"})
        stream_body = {**BODY, "stream": True}
        # Each gateway gets the same warm-up at load before its measured rows (JIT, caches,
        # connection pools, a just-started Serve's background work): measured rows compare warm
        # processes, not the first seconds after start.
        wrk(f"{base}/v1/chat/completions", 32, WARMUP_S, BODY, risky or key)
        if portkey:
            wrk(portkey[1], 32, WARMUP_S, BODY, "sk-x", portkey[2])
        if tz:
            wrk(tz[1], 32, WARMUP_S, tz[2], None)
        for c in (1, 32):
            results[f"upstream direct, c={c}"] = wrk(f"http://127.0.0.1:{mock_port}/v1/chat/completions", c,
                                                     args.duration, BODY, None)
            if not (args.gateway_only and risky):
                results[f"gateway non-stream, c={c}"] = wrk(f"{base}/v1/chat/completions", c, args.duration,
                                                            BODY, key)
            if not args.skip_stream:
                results[f"gateway stream, c={c}"] = wrk(f"{base}/v1/chat/completions", c, args.duration,
                                                        stream_body, key)
            if risky:
                before = cpu_seconds(home, mock.pid) if args.cpu and c == 32 else None
                results[f"gateway non-stream, all risk controls, c={c}"] = wrk(
                    f"{base}/v1/chat/completions", c, args.duration, BODY, risky)
                if before is not None:
                    served = results[f"gateway non-stream, all risk controls, c={c}"]["rps"] * args.duration
                    after = cpu_seconds(home, mock.pid)
                    cpu_note = ", ".join(f"{name} {1000 * (after[name] - before.get(name, 0)) / served:.2f}"
                                         for name in sorted(after))
            if args.serve_path:
                with data_servers_paused(home):
                    results[f"gateway via Serve's port, {'all risk controls' if risky else 'plain key'}, c={c}"] = wrk(
                        f"{base}/v1/chat/completions", c, args.duration, BODY, risky or key)
            if portkey:
                results[f"portkey gateway, c={c}"] = wrk(portkey[1], c, args.duration, BODY, "sk-x", portkey[2])
            if tz:
                results[f"tensorzero gateway, c={c}"] = wrk(tz[1], c, args.duration, tz[2], None)
    finally:
        subprocess.run([*cli, "down"], env=env, capture_output=True)
        mock.kill()
        for side in (portkey, tz):
            if side:
                side[0].kill()
                side[0].wait()
    if args.litellm:
        results.update(run_litellm(args.litellm_bin, mock_port, args.duration))
    # The machine's load when the run began and ended (1-minute average; the run's own processes
    # count in the second): a figure from a busy machine says little.
    print(f"\nload average: {load_before[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end "
          f"({os.cpu_count()} cores)")
    print(f"\n{'path':52} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}")
    for name, r in results.items():
        print(f"{name:52} {r['rps']:9.0f} {r['p50']:8.2f} {r['p99']:8.2f} {r['non2xx']:8d} {r['socket_errors']}")
    for c in (1, 32):
        direct = results[f"upstream direct, c={c}"]
        plain = results.get(f"gateway non-stream, c={c}")
        risk = results.get(f"gateway non-stream, all risk controls, c={c}")
        gw = risk or plain
        assert gw is not None
        print(f"c={c}: gateway/upstream throughput {gw['rps'] / max(direct['rps'], 1):.3f}, "
              f"added p50 {gw['p50'] - direct['p50']:.2f} ms")
        if risk and plain:
            print(f"c={c}: risk controls cost {100 * (1 - risk['rps'] / max(plain['rps'], 1)):.1f}% of throughput")
        if f"litellm proxy, c={c}" in results:
            litellm = results[f"litellm proxy, c={c}"]
            print(f"c={c}: gateway/LiteLLM throughput {gw['rps'] / max(litellm['rps'], 1):.2f}")
    if args.cpu and risky:
        print(f"c=32, all risk controls: CPU ms per request by process: {cpu_note}")
    portkey = {c: results.get(f"portkey gateway, c={c}") for c in (1, 32)}
    if portkey[1] and portkey[32]:
        which = "all risk controls" if args.risk else "plain key"
        gw32 = results.get("gateway non-stream, all risk controls, c=32") or results["gateway non-stream, c=32"]
        gw1 = results.get("gateway non-stream, all risk controls, c=1") or results["gateway non-stream, c=1"]
        print(f"Trex ({which}) / Portkey: req/s at 32 connections {gw32['rps'] / max(portkey[32]['rps'], 1):.2f}x "
              f"(target >= 1.0), p50 at 1 connection {gw1['p50'] / portkey[1]['p50']:.2f}x (target <= 1.5)")
    tzr = {c: results.get(f"tensorzero gateway, c={c}") for c in (1, 32)}
    if tzr[1] and tzr[32]:
        gw32 = results.get("gateway non-stream, all risk controls, c=32") or results["gateway non-stream, c=32"]
        gw1 = results.get("gateway non-stream, all risk controls, c=1") or results["gateway non-stream, c=1"]
        print(f"Trex / TensorZero: req/s at 32 connections {gw32['rps'] / max(tzr[32]['rps'], 1):.2f}x "
              f"(target >= 0.5), p50 at 1 connection {gw1['p50'] / tzr[1]['p50']:.2f}x")
    return 0


def cpu_seconds(home: Path, mock_pid: int) -> dict[str, float]:
    """User + system CPU seconds so far of this gateway's processes (found by their TREX_HOME) and
    of the mock, by role."""
    import psutil

    roles = (("Ingress", "ingress replicas"), ("pool-", "pool replicas"), ("front_sync", "front sync"),
             ("haproxy", "HAProxy (both)"))
    out: dict[str, float] = {"mock upstream": sum(psutil.Process(mock_pid).cpu_times()[:2])}
    marker = f"TREX_HOME={home}".encode()
    redis_port = json.loads((home / "gateway.json").read_text())["redis_url"].rsplit(":", 1)[1].split("/")[0]
    for proc in psutil.process_iter(["pid", "cmdline", "name"]):
        text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["name"] or "")
        role = next((name for tag, name in roles if tag in text), None)
        try:
            if "redis-server" in text and f":{redis_port}" in text:
                role = "Redis"  # Redis rewrites its environment area: found by its port instead
            elif role is None or marker not in Path(f"/proc/{proc.info['pid']}/environ").read_bytes().split(b"\0"):
                continue
            out[role] = out.get(role, 0.0) + sum(proc.cpu_times()[:2])
        except (OSError, psutil.Error):
            continue
    return out


@contextlib.contextmanager
def data_servers_paused(home: Path) -> Iterator[None]:
    """The front proxy's direct data servers in maintenance for a while: the hot route then takes
    the backup, Serve's port (front_sync changes slots only when the live set changes)."""
    from trex_serve.local.front_proxy import admin_socket_path
    from trex_serve.local.front_sync import admin

    sock = admin_socket_path(home)
    rows = [line.split(",") for line in admin(sock, "show stat").splitlines() if line.startswith("data,d")]
    names = [row[1] for row in rows if row[17] == "UP"]
    admin(sock, ";".join(f"set server data/{n} state maint" for n in names))
    try:
        yield
    finally:
        admin(sock, ";".join(f"set server data/{n} state ready" for n in names))
        time.sleep(2)  # health checks bring them back


def start_portkey(folder: Path, mock_port: int) -> tuple[subprocess.Popen, str, dict[str, str]] | None:
    """Portkey's gateway against the same upstream (it forwards to `x-portkey-custom-host`), or None
    with a note when it is not installed in ``folder``."""
    server = folder / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    node = shutil.which("node")
    if not server.exists() or not node:
        print(f"Portkey's gateway is not installed in {folder} (npm install @portkey-ai/gateway): skipped")
        return None
    port = free_port()
    proc = subprocess.Popen([node, str(server), f"--port={port}", "--headless"], cwd=folder,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    headers = {"x-portkey-provider": "openai", "x-portkey-custom-host": f"http://127.0.0.1:{mock_port}/v1"}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    deadline = time.time() + 60
    while not port_open("127.0.0.1", port) and time.time() < deadline:
        time.sleep(0.2)
    status, text = 0, "did not start"
    for _ in range(50):
        try:
            r = httpx.post(url, json=BODY, headers={**headers, "Authorization": "Bearer sk-x"}, timeout=30)
            status, text = r.status_code, r.text
        except httpx.HTTPError as exc:
            status, text = 0, str(exc)
    if status != 200:
        proc.kill()
        print(f"Portkey's gateway answered {status}: {text[:200]}: skipped")
        return None
    return proc, url, headers


def run_litellm(binary: str, mock_port: int, duration: int) -> dict[str, dict]:
    if not shutil.which(binary):
        print("LiteLLM is not installed (pip install 'litellm[proxy]'): skipped")
        return {}
    home = Path(tempfile.mkdtemp(prefix="litellm-bench-"))
    cfg = home / "config.yaml"
    cfg.write_text(f"""
model_list:
  - model_name: gpt-4o-mini
    litellm_params: {{model: openai/gpt-4o-mini, api_base: "http://127.0.0.1:{mock_port}/v1", api_key: sk-x}}
general_settings: {{master_key: sk-bench}}
""")
    port = free_port()
    mock = start_mock(mock_port)
    proc = subprocess.Popen([binary, "--config", str(cfg), "--port", str(port), "--num_workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not port_open("127.0.0.1", port) and time.time() < deadline:
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        for _ in range(20):
            httpx.post(url, json=BODY, headers={"Authorization": "Bearer sk-bench"}, timeout=30)
        return {f"litellm proxy, c={c}": wrk(url, c, duration, BODY, "sk-bench") for c in (1, 32)}
    finally:
        proc.kill()
        mock.kill()


if __name__ == "__main__":
    sys.exit(main())
