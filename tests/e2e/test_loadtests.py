"""The Locust suites of loadtests/ at small scale against one real gateway (`trex-serve up --detach`)
with two mock upstreams: each suite must exit 0 (every asserted threshold held)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import MockProcess, write_catalog
from trex_serve.local.embedded import free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]

# A plan without practical limits, so the suites' own key limits are the only ones that bite.
LOAD_PLAN = """  - name: load
    rpm: 1000000
    tpm: 1000000000
    concurrency: 1000
    burst_concurrency: 1000
    daily_quota: {requests: 10000000, tokens: 10000000000}
    long_context_tokens: 32000
    premium: true
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    home = tmp_path_factory.mktemp("trex-load")
    mocks = {"alpha": MockProcess("alpha"), "beta": MockProcess("beta")}
    catalog = write_catalog(home / "catalog.yaml", mocks, extra=LOAD_PLAN)
    port = free_port()
    env = {**os.environ, "TREX_HOME": str(home), "TREX_CATALOG": str(catalog), "TREX_HTTP_PORT": str(port),
           "TREX_ADMIN_TOKEN": "op-token-load"}
    env.pop("TREX_REDIS_URL", None)
    env.pop("TREX_DATABASE_URL", None)
    cli = [sys.executable, "-m", "trex_serve.local.cli"]
    up = subprocess.run([*cli, "up", "--detach", "--ray-port", str(free_port()), "--num-cpus", "2"], env=env,
                        capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield {"base": f"http://127.0.0.1:{port}", "catalog": str(catalog), "token": "op-token-load",
               "mocks": mocks}
    finally:
        subprocess.run([*cli, "down"], env=env, capture_output=True, timeout=120)
        for m in mocks.values():
            m.stop()


def run_suite(gateway, suite: str, *extra: str, timeout: float = 120) -> str:
    for m in gateway["mocks"].values():
        m.reset()
    cmd = [sys.executable, "-m", "loadtests.run", suite, "--host", gateway["base"],
           "--admin-token", gateway["token"], "--catalog", gateway["catalog"], *extra]
    done = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True, timeout=timeout)
    out = done.stdout + done.stderr
    print(out)
    assert done.returncode == 0, f"{suite} exited {done.returncode}:\n{out[-4000:]}"
    assert f"PASS {suite}" in out
    return out


def test_steady(gateway):
    run_suite(gateway, "steady", "--plan", "load", "--users", "4", "--spawn-rate", "4", "--run-time", "3s")


def test_routes_mix_anthropic_messages_with_openai_chat(gateway):
    # the suite itself fails unless /v1/messages (whole and streamed) and chat were all answered
    run_suite(gateway, "routes", "--plan", "load", "--users", "4", "--spawn-rate", "4", "--run-time", "3s")


def test_conversations_chain_responses_and_hit_the_cache(gateway):
    # the suite fails unless chains of 4 turns were answered, echoed, stored and the cache hit
    run_suite(gateway, "conversations", "--plan", "load", "--users", "4", "--spawn-rate", "4", "--run-time", "4s",
              "--turns", "4")


def test_limits(gateway):
    run_suite(gateway, "limits", "--plan", "load", "--users", "8", "--spawn-rate", "8", "--run-time", "3s",
              "--rpm", "5", "--rpm-keys", "2", "--conc-keys", "2")


def test_fallback(gateway):
    run_suite(gateway, "fallback", "--plan", "load", "--users", "4", "--spawn-rate", "4", "--run-time", "4s",
              "--recovery-timeout", "40")


def test_billing(gateway):
    run_suite(gateway, "billing", "--plan", "load", "--users", "4", "--spawn-rate", "4", "--run-time", "3s",
              "--credits", "100")


def test_replica_loss(gateway):
    run_suite(gateway, "replica_loss", "--plan", "load", "--users", "4", "--spawn-rate", "4", "--run-time", "4s",
              "--recovery-timeout", "60")
