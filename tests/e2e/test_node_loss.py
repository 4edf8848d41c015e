"""More than one node: on a two-node Ray cluster on this machine (`trex-serve up --nodes 2`), the
ingress replicas and each pool's replicas sit on different nodes; when the worker node is lost
(its raylet and every process under it SIGKILLed) under concurrent clients, every answer is a
success or the OpenAI envelope and every credit-billed answer is charged once (the Locust
`node_loss` suite); every deployment is then back at its replica count on the surviving node
without a redeploy by hand (the spread supervisor, deployments/spreader.py), the balances
reconcile, and when a node joins again the replicas are spread over both nodes again."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.e2e.test_loadtests import LOAD_PLAN, REPO
from tests.helpers import MockProcess, write_catalog
from trex_serve.local.embedded import free_port
from trex_serve.local.processes import ray_temp_dir

pytestmark = pytest.mark.e2e

PLACEMENT = """
import collections, json, sys, ray
from ray._private import state
ray.init(address="127.0.0.1:" + sys.argv[1], logging_level="ERROR", log_to_driver=False)
alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
out = collections.defaultdict(list)
for a in state.actors().values():
    if a["ActorClassName"].startswith("ServeReplica:") and a["State"] == "ALIVE":
        node = a["Address"]["NodeID"]
        out[a["ActorClassName"].split(":")[-1]].append(node if node in alive else "dead")
print("PLACEMENT " + json.dumps({"nodes": len(alive), "replicas": out}))
"""


SERVING = """
import json, sys, ray
from ray.serve.context import _get_global_client
ray.init(address="127.0.0.1:" + sys.argv[1], logging_level="ERROR", log_to_driver=False)
alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
out = {}
for name, dep in _get_global_client().get_serve_details()["applications"]["trex"]["deployments"].items():
    out[name] = [r["node_id"] if r["node_id"] in alive else "dead" for r in dep["replicas"]
                 if str(getattr(r["state"], "value", r["state"])) == "RUNNING"]
print("SERVING " + json.dumps({"nodes": len(alive), "running": out}))
"""
COUNTS = {"Ingress": 2, "pool-alpha": 2, "pool-beta": 2}


def serving(ray_port: int) -> dict:
    """Serve's own view: the RUNNING replicas of each deployment and their nodes."""
    out = subprocess.run([sys.executable, "-c", SERVING, str(ray_port)], capture_output=True, text=True,
                         timeout=60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("SERVING ")), None)
    assert line is not None, out.stdout[-2000:] + out.stderr[-2000:]
    return json.loads(line.removeprefix("SERVING "))


def wait_for(ray_port: int, ready, timeout_s: float) -> tuple[float | None, dict]:
    """(the moment ``ready(serving state)`` first held, or None; the last state seen)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = serving(ray_port)
        if ready(state):
            return time.time(), state
        if time.monotonic() > deadline:
            return None, state
        time.sleep(1)


def placement(ray_port: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PLACEMENT, str(ray_port)], capture_output=True, text=True,
                         timeout=60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("PLACEMENT ")), None)
    assert line is not None, out.stdout[-2000:] + out.stderr[-2000:]
    return json.loads(line.removeprefix("PLACEMENT "))


def raylet_pid(node_manager_port: int) -> int:
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if cmd and cmd[0].endswith("/raylet") and f"--node_manager_port={node_manager_port}" in cmd:
            return proc.info["pid"]
    raise AssertionError(f"no raylet with node manager port {node_manager_port}")


def spread(replicas: dict, name: str) -> bool:
    return len(replicas.get(name, [])) == 2 and len(set(replicas[name])) == 2


def test_replicas_spread_and_a_lost_node_costs_no_request(tmp_path):
    mocks = {"alpha": MockProcess("alpha"), "beta": MockProcess("beta")}
    catalog = write_catalog(tmp_path / "catalog.yaml", mocks, extra=LOAD_PLAN)
    port, ray_port = free_port(), free_port()
    pools = {p: {"min_replicas": 2, "max_replicas": 2} for p in ("alpha", "beta")}
    env = {**os.environ, "TREX_HOME": str(tmp_path), "TREX_CATALOG": str(catalog), "TREX_HTTP_PORT": str(port),
           "TREX_ADMIN_TOKEN": "op", "TREX_INGRESS_REPLICAS": "2", "TREX_POOL_AUTOSCALING": json.dumps(pools)}
    env.pop("TREX_REDIS_URL", None)
    env.pop("TREX_DATABASE_URL", None)
    cli = [sys.executable, "-m", "trex_serve.local.cli"]
    up = subprocess.run([*cli, "up", "--detach", "--nodes", "2", "--ray-port", str(ray_port), "--num-cpus", "1"],
                        env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        where = placement(ray_port)
        assert where["nodes"] == 2
        for name in ("Ingress", "pool-alpha", "pool-beta"):
            assert spread(where["replicas"], name), f"{name} not spread over both nodes: {where}"
        worker = json.loads((tmp_path / "gateway.json").read_text())["worker_nodes"][0]
        done = subprocess.run([sys.executable, "-m", "loadtests.run", "node_loss", "--host",
                               f"http://127.0.0.1:{port}", "--admin-token", "op", "--catalog", str(catalog),
                               "--plan", "load", "--users", "6", "--spawn-rate", "6", "--run-time", "6s",
                               "--kill-raylet-pid", str(raylet_pid(worker["node_manager_port"]))],
                              cwd=str(REPO), capture_output=True, text=True, timeout=120)
        out = done.stdout + done.stderr
        print(out)
        assert done.returncode == 0 and "PASS node_loss" in out, out[-4000:]
        lost_at = float(re.search(r"\(at (\d+\.\d+)\)", out).group(1))  # type: ignore[union-attr]
        # Capacity comes back by itself: every deployment at its count on the surviving node.
        restored, state = wait_for(ray_port, lambda s: s["nodes"] == 1 and all(
            len(s["running"].get(n, [])) >= c and "dead" not in s["running"][n] for n, c in COUNTS.items()), 180)
        assert restored is not None, f"capacity not restored on the surviving node: {state}"
        print(f"capacity restored {restored - lost_at:.1f} s after the node was lost: "
              f"{ {n: len(r) for n, r in state['running'].items()} }")
        rec = subprocess.run([*cli, "billing", "reconcile"], env=env, capture_output=True, text=True, timeout=60)
        assert rec.returncode == 0 and '"mismatched": 0' in rec.stdout, rec.stdout + rec.stderr
        # A node joins again: the supervisor deploys the app again and the replicas spread over both.
        ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
        rejoin = subprocess.run([ray, "start", f"--address=127.0.0.1:{ray_port}", "--num-cpus=1",
                                 "--disable-usage-stats", f"--temp-dir={ray_temp_dir(tmp_path)}"],
                                env=env, capture_output=True, text=True, timeout=120)
        assert rejoin.returncode == 0, rejoin.stderr[-2000:]
        joined = time.time()
        respread, state = wait_for(ray_port, lambda s: s["nodes"] == 2 and all(
            len(s["running"].get(n, [])) == c and len(set(s["running"][n])) == 2 for n, c in COUNTS.items()), 180)
        assert respread is not None, f"not spread again over the joined node: {state}"
        print(f"spread again {respread - joined:.1f} s after the node joined")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            where = placement(ray_port)
            if all(spread(where["replicas"], n) for n in ("Ingress", "pool-alpha", "pool-beta")):
                break
            time.sleep(2)
        assert all(spread(where["replicas"], n) for n in ("Ingress", "pool-alpha", "pool-beta")), where
    finally:
        subprocess.run([*cli, "down"], env=env, capture_output=True, timeout=120)
        for m in mocks.values():
            m.stop()
