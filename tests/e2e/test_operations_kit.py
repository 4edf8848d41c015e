"""End to end, the operations kit on the real Serve app (`trex-serve up --detach`): traces exported
over OTLP/HTTP into a small receiver started here (one trace across the ingress and pool processes,
on to the provider), and the Grafana dashboard and alert rules read against a live /metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from tests import ops_files
from tests.helpers import MockProcess, write_catalog
from tests.otlp_receiver import Receiver
from trex_serve.local.embedded import free_port

pytestmark = pytest.mark.e2e

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
PROMPT = "a prompt that must never reach a span"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    home = tmp_path_factory.mktemp("trex-ops")
    receiver = Receiver().start()
    mocks = {"alpha": MockProcess("alpha"), "beta": MockProcess("beta")}
    catalog = write_catalog(home / "catalog.yaml", mocks)
    port = free_port()
    env = {**os.environ, "TREX_HOME": str(home), "TREX_CATALOG": str(catalog), "TREX_HTTP_PORT": str(port),
           "TREX_ADMIN_TOKEN": "op-token-ops", "TREX_INGRESS_REPLICAS": "1",
           "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": "trex-e2e",
           "OTEL_BSP_SCHEDULE_DELAY": "200"}
    for var in ("TREX_REDIS_URL", "TREX_DATABASE_URL", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED",
                "OTEL_TRACES_EXPORTER", "OTEL_TRACES_SAMPLER"):
        env.pop(var, None)
    cli = [sys.executable, "-m", "trex_serve.local.cli"]
    up = subprocess.run([*cli, "up", "--detach", "--ray-port", str(free_port()), "--num-cpus", "2"], env=env,
                        capture_output=True, text=True, timeout=300)
    try:
        if up.returncode != 0:
            pytest.fail(up.stdout[-3000:] + up.stderr[-3000:])
        base = f"http://127.0.0.1:{port}"
        admin = httpx.Client(base_url=f"{base}/admin/v1", headers={"Authorization": "Bearer op-token-ops"},
                             timeout=30)
        account = admin.post("/accounts", json={"name": "ops", "plan": "free"}).json()
        key = admin.post(f"/accounts/{account['id']}/keys", json={"name": "ops"}).json()["key"]
        yield {"base": base, "key": key, "mocks": mocks, "receiver": receiver,
               "http": httpx.Client(base_url=base, timeout=30)}
    finally:
        subprocess.run([*cli, "down"], env=env, capture_output=True, timeout=120)
        for m in mocks.values():
            m.stop()
        receiver.stop()


def chat(gateway, key=None, headers=None):
    return gateway["http"].post("/v1/chat/completions", json={
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]},
        headers={"Authorization": f"Bearer {key or gateway['key']}", **(headers or {})})


def wait_for(check, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_a_fallback_is_one_trace_from_client_through_both_processes_to_the_provider(gateway):
    for m in gateway["mocks"].values():
        m.reset()
    gateway["mocks"]["alpha"].control(fail_next=1, error_status=503)
    r = chat(gateway, headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
    assert r.status_code == 200 and r.headers["x-trex-attempts"] == "2"
    receiver = gateway["receiver"]

    def complete():
        spans = receiver.trace(CLIENT_TRACE)
        return spans if sum(s["name"].startswith("trex.pool") for s in spans) == 2 and any(
            s["name"] == "trex.settlement" for s in spans) else None

    spans = wait_for(complete)
    assert spans, receiver.spans
    by_id = {s["span_id"]: s for s in spans}
    [server] = [s for s in spans if s["name"] == "POST /v1/chat/completions"]
    assert server["parent_span_id"] == CLIENT_SPAN and server["kind"] == "SERVER"
    assert server["resource"]["service.name"] == "trex-e2e" and server["resource"]["trex.component"] == "ingress"
    a = server["attributes"]
    assert a["trex.request_id"] == r.headers["x-trex-request-id"] and a["trex.attempts"] == 2
    assert a["gen_ai.provider.name"] == "beta" and a["gen_ai.request.model"] == "gpt-4o-mini"
    assert a["gen_ai.usage.output_tokens"] > 0 and a["trex.billing"] == "quota"
    for name in ("trex.admission", "trex.settlement"):
        [step] = [s for s in spans if s["name"] == name]
        assert step["parent_span_id"] == server["span_id"]
    attempts = sorted((s for s in spans if s["kind"] == "CLIENT"), key=lambda s: s["start_ns"])
    assert [s["attributes"]["gen_ai.provider.name"] for s in attempts] == ["alpha", "beta"]
    assert all(s["parent_span_id"] == server["span_id"] for s in attempts)
    assert attempts[0]["attributes"]["http.response.status_code"] == 503
    assert attempts[1]["attributes"]["trex.retry_reason"] == "http_503"
    pools = [s for s in spans if s["name"].startswith("trex.pool")]
    for pool in pools:  # exported by the pool replica's own process, parented on the ingress's attempt
        assert pool["resource"]["trex.component"] == "pool" and pool["kind"] == "SERVER"
        assert by_id[pool["parent_span_id"]]["kind"] == "CLIENT"
        assert pool["resource"]["process.pid"] != server["resource"]["process.pid"]
    beta_pool = next(p for p in pools if p["attributes"]["gen_ai.provider.name"] == "beta")
    assert gateway["mocks"]["beta"].stats()["last_traceparent"] == f"00-{CLIENT_TRACE}-{beta_pool['span_id']}-01"
    for s in spans:
        assert PROMPT not in str(s["attributes"]) and gateway["key"] not in str(s["attributes"])


def test_dashboard_and_alert_rules_against_live_metrics(gateway, tmp_path):
    for m in gateway["mocks"].values():
        m.reset()
    http = gateway["http"]
    before = http.get("/metrics").text
    for _ in range(2):
        assert chat(gateway).status_code == 200
    gateway["mocks"]["alpha"].control(fail_next=6, error_status=503)
    for _ in range(6):  # alpha fails, beta answers: fallbacks, then the router opens alpha's circuit
        assert chat(gateway).status_code == 200
    assert chat(gateway, key="trex-not-a-key").status_code == 401  # a rejection
    open_key = ("trex_circuit_state", (("model", "alpha-mini"), ("provider", "alpha"), ("state", "open")))

    def scrape_with_open_circuit():
        text = http.get("/metrics").text
        return text if ops_files.samples(text).get(open_key, (0,))[0] == 1 else None

    after = wait_for(scrape_with_open_circuit)
    assert after, "alpha's circuit never showed open in /metrics"

    exported = ops_files.exported_names(after)
    for title, expr in ops_files.dashboard_queries():
        assert ops_files.metric_names(expr) <= exported, (title, ops_files.metric_names(expr) - exported)
    for rule in ops_files.alert_rules():
        assert ops_files.metric_names(rule["expr"]) <= exported, rule["alert"]
    if ops_files.promtool() is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'): rules not evaluated")
    firing = {"TrexUpstreamErrorRateHigh": [{"provider": "alpha"}],
              "TrexCircuitOpen": [{"provider": "alpha", "model": "alpha-mini"}]}
    done = ops_files.run_rule_tests(before, after, firing, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
