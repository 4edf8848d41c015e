"""The real Serve app (`trex-serve up`) on a Redis primary with two replicas and three sentinels
(`python -m trex_serve.local.sentinel_set`, loopback), ``TREX_REDIS_URL`` their
``redis+sentinel://`` URL and durable writes on (``TREX_REDIS_WAIT_REPLICAS=1``). Under a Locust
load (`redis_failover` suite) replication is cut, then the primary SIGKILLed 0.5 s later: every
answer is a 200 or a 503 in the envelope, the gateway serves again after the promotion without a
restart, the ledger charged exactly the credit-billed 200 answers (none lost with the old primary's
unreplicated writes, none twice), the balances reconcile, and the promoted primary has the
surviving replica attached. The gateway is started from a home whose ~/.ray holds a stale token, as a
plain ray.init() leaves one (it used to make `up` fail)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
import redis

from tests.e2e.test_loadtests import LOAD_PLAN, REPO
from tests.helpers import MockProcess, write_catalog
from trex_serve.local.embedded import free_port

pytestmark = pytest.mark.e2e


def start_sentinel_set(workdir) -> tuple[subprocess.Popen, str, list[int]]:
    proc = subprocess.Popen([sys.executable, "-m", "trex_serve.local.sentinel_set", "--dir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [proc.stdout.readline() for _ in range(2)]  # type: ignore[union-attr]
    assert lines[0].startswith("TREX_REDIS_URL="), "".join(lines)
    url = lines[0].strip().split("=", 1)[1]
    sentinels = [int(p) for p in re.findall(r":(\d+)", url.split("/")[2])]
    return proc, url, sentinels


def test_a_redis_failover_under_load_loses_no_charge_and_charges_none_twice(tmp_path):
    sset, url, sentinels = start_sentinel_set(tmp_path / "redis")
    mocks = {"alpha": MockProcess("alpha"), "beta": MockProcess("beta")}
    catalog = write_catalog(tmp_path / "catalog.yaml", mocks, extra=LOAD_PLAN)
    port = free_port()
    env = {**os.environ, "TREX_HOME": str(tmp_path / "home"), "TREX_CATALOG": str(catalog),
           "TREX_HTTP_PORT": str(port), "TREX_ADMIN_TOKEN": "op", "TREX_REDIS_URL": url,
           "TREX_REDIS_WAIT_REPLICAS": "1"}
    env.pop("TREX_DATABASE_URL", None)
    env.pop("RAY_AUTH_MODE", None)
    stale = tmp_path / "user-home" / ".ray"
    stale.mkdir(parents=True)
    (stale / "auth_token").write_text("0" * 32 + "\n")
    env["HOME"] = str(stale.parent)
    cli = [sys.executable, "-m", "trex_serve.local.cli"]
    try:
        up = subprocess.run([*cli, "up", "--detach", "--ray-port", str(free_port()), "--num-cpus", "2"],
                            env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        done = subprocess.run([sys.executable, "-m", "loadtests.run", "redis_failover", "--host",
                               f"http://127.0.0.1:{port}", "--admin-token", "op", "--catalog", str(catalog),
                               "--plan", "load", "--users", "8", "--spawn-rate", "8", "--run-time", "10s",
                               "--node-loss-latency-ms", "100", "--redis-fault-pid", str(sset.pid),
                               "--cut-replication-s", "0.5"],
                              cwd=str(REPO), capture_output=True, text=True, timeout=180)
        out = done.stdout + done.stderr
        print(out)
        assert done.returncode == 0 and "PASS redis_failover" in out, out[-4000:]
        # The balances the gateway keeps in Redis equal the SQL ledger (minus nothing: drained).
        rec = subprocess.run([*cli, "billing", "reconcile"], env=env, capture_output=True, text=True, timeout=60)
        assert rec.returncode == 0 and '"mismatched": 0' in rec.stdout, rec.stdout + rec.stderr
        # The promoted primary, as the sentinels name it, has the surviving replica attached.
        host, primary = redis.Redis(port=sentinels[0]).sentinel_get_master_addr_by_name("trex")
        replication = redis.Redis(host=host, port=int(primary)).info("replication")
        assert replication["role"] == "master" and replication["connected_slaves"] == 1, replication
    finally:
        subprocess.run([*cli, "down"], env=env, capture_output=True, timeout=120)
        for m in mocks.values():
            m.stop()
        sset.send_signal(signal.SIGTERM)
        sset.wait(timeout=30)
