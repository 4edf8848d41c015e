"""The real Serve app for end-to-end modules: `trex-serve up --detach` with mock upstream processes,
real Redis and SQLite (one gateway per module that asks for it)."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from tests.helpers import MockProcess, write_catalog
from trex_serve.local.embedded import free_port


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    home = tmp_path_factory.mktemp("trex-e2e")
    mocks = {"alpha": MockProcess("alpha"), "beta": MockProcess("beta")}
    catalog = write_catalog(home / "catalog.yaml", mocks, extra="""
  - name: tiny
    rpm: 100
    concurrency: 4
    daily_quota: {requests: 2}
""")
    port = free_port()
    env = {**os.environ, "TREX_HOME": str(home), "TREX_CATALOG": str(catalog), "TREX_HTTP_PORT": str(port),
           "TREX_ADMIN_TOKEN": "op-token-e2e",
           "TREX_INGRESS_REPLICAS": "2"}
    env.pop("TREX_REDIS_URL", None)
    env.pop("TREX_DATABASE_URL", None)
    cli = [sys.executable, "-m", "trex_serve.local.cli"]
    ray_port = str(free_port())
    up = subprocess.run([*cli, "up", "--detach", "--ray-port", ray_port, "--num-cpus", "2"], env=env,
                        capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        subprocess.run([*cli, "down"], env=env, capture_output=True, timeout=120)
        for m in mocks.values():  # a failed start must not leave the mock processes behind
            m.stop()
        pytest.fail(up.stdout[-3000:] + up.stderr[-3000:])
    base = f"http://127.0.0.1:{port}"
    admin = httpx.Client(base_url=f"{base}/admin/v1", headers={"Authorization": "Bearer op-token-e2e"}, timeout=30)
    account = admin.post("/accounts", json={"name": "e2e", "plan": "free"}).json()
    key = admin.post(f"/accounts/{account['id']}/keys", json={"name": "main"}).json()
    admin.post(f"/accounts/{account['id']}/credits", json={"amount": 5, "reason": "e2e"})
    yield {"base": base, "admin": admin, "account": account, "key": key["key"], "mocks": mocks, "env": env,
           "ray_port": ray_port}
    subprocess.run([*cli, "down"], env=env, capture_output=True, timeout=120)
    for m in mocks.values():
        m.stop()
