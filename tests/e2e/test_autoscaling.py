"""A provider pool scales on the in-flight count it reports (Serve cannot see relayed requests):
up under load, back down when the load stops. Real Serve app, slow mock upstream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.helpers import MockProcess, running_replicas, write_catalog
from trex_serve.local.embedded import free_port

pytestmark = pytest.mark.e2e

def test_pool_scales_up_under_load_and_back_down(tmp_path):
    mocks = {"alpha": MockProcess("alpha"), "beta": MockProcess("beta")}
    catalog = write_catalog(tmp_path / "catalog.yaml", mocks)
    port, ray_port = free_port(), str(free_port())
    autoscale = {"alpha": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4,
                           "upscale_delay_s": 1, "downscale_delay_s": 4, "metrics_interval_s": 0.5,
                           "look_back_period_s": 2}}
    env = {**os.environ, "TREX_HOME": str(tmp_path), "TREX_CATALOG": str(catalog), "TREX_HTTP_PORT": str(port),
           "TREX_ADMIN_TOKEN": "op", "TREX_POOL_AUTOSCALING": json.dumps(autoscale)}
    env.pop("TREX_REDIS_URL", None)
    env.pop("TREX_DATABASE_URL", None)
    cli = [sys.executable, "-m", "trex_serve.local.cli"]
    up = subprocess.run([*cli, "up", "--detach", "--ray-port", ray_port, "--num-cpus", "2"], env=env,
                        capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        base = f"http://127.0.0.1:{port}"
        admin = httpx.Client(base_url=f"{base}/admin/v1", headers={"Authorization": "Bearer op"}, timeout=30)
        acc = admin.post("/accounts", json={"name": "scale", "plan": "free"}).json()
        key = admin.post(f"/accounts/{acc['id']}/keys", json={}).json()["key"]
        assert running_replicas(ray_port)["pool-alpha"] == 1
        mocks["alpha"].control(latency_ms=300)
        stop = threading.Event()
        statuses: list[int] = []

        def load() -> None:
            with httpx.Client(base_url=base, timeout=30) as http:
                while not stop.is_set():
                    r = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
                    statuses.append(r.status_code)

        threads = [threading.Thread(target=load) for _ in range(24)]
        for t in threads:
            t.start()
        peak, deadline = 1, time.time() + 60
        while time.time() < deadline and peak < 2:
            time.sleep(2)
            peak = max(peak, running_replicas(ray_port)["pool-alpha"])
        stop.set()
        for t in threads:
            t.join()
        assert peak == 2, "the pool did not scale up under load"
        assert set(statuses) == {200}
        low, deadline = peak, time.time() + 90
        while time.time() < deadline and low > 1:
            time.sleep(3)
            low = running_replicas(ray_port)["pool-alpha"]
        assert low == 1, "the pool did not scale back down when the load stopped"
    finally:
        subprocess.run([*cli, "down"], env=env, capture_output=True, timeout=120)
        for m in mocks.values():
            m.stop()
