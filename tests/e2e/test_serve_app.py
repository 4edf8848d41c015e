"""End to end: the real Ray Serve app started by `trex-serve up --detach`, mock upstream processes,
real Redis and SQLite, driven by the official openai SDK."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import running_replicas

pytestmark = pytest.mark.e2e


@pytest.fixture
def client(gateway):
    for m in gateway["mocks"].values():
        m.reset()
    return openai.OpenAI(base_url=f"{gateway['base']}/v1", api_key=gateway["key"], max_retries=0)


def test_models_list_includes_smart_auto(client):
    ids = [m.id for m in client.models.list()]
    assert "smart-auto" in ids and "gpt-4o-mini" in ids


def test_chat_non_stream_through_one_hop(client):
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
    answer = raw.parse()
    assert answer.choices[0].message.content.startswith("Hello from alpha")
    assert raw.headers["x-trex-upstream-provider"] == "alpha"
    assert raw.headers["x-trex-billing"] == "quota"
    assert raw.headers["x-trex-request-id"].startswith("req_")
    assert int(raw.headers["x-ratelimit-remaining-requests"]) >= 0
    assert answer.usage.completion_tokens > 0


def test_chat_stream_with_usage(client):
    stream = client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                            messages=[{"role": "user", "content": "stream"}],
                                            stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text.startswith("Hello from alpha") and usage and usage.completion_tokens > 0


def test_fallback_on_503_uses_next_candidate(gateway, client):
    gateway["mocks"]["alpha"].control(fail_next=1, error_status=503)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
    assert raw.headers["x-trex-upstream-provider"] == "beta"
    assert raw.headers["x-trex-attempts"] == "2"


def test_stream_falls_back_before_first_byte(gateway, client):
    gateway["mocks"]["alpha"].control(fail_next=1, error_status=429)
    stream = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "x"}])
    assert stream.headers["x-trex-upstream-provider"] == "beta"
    text = "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices)
    assert text.startswith("Hello from beta")


def test_all_failed_is_502_with_attempts(gateway, client):
    for m in gateway["mocks"].values():
        m.control(fail_next=1, error_status=500)
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 502
    body = err.value.body
    assert body["code"] == "upstream_unavailable" and len(body["trex"]["attempts"]) == 2


def test_unknown_key_and_model(gateway, client):
    bad = openai.OpenAI(base_url=f"{gateway['base']}/v1", api_key="trex-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "model_not_found"


def test_premium_model_bills_credits_exactly(gateway, client):
    admin, acc = gateway["admin"], gateway["account"]["id"]
    before = admin.get(f"/accounts/{acc}/usage").json()["credits"]["charged_micro"]
    raw = client.chat.completions.with_raw_response.create(
        model="big-model", messages=[{"role": "user", "content": "premium please"}])
    usage = raw.parse().usage
    assert raw.headers["x-trex-billing"] == "credits"
    expected = usage.prompt_tokens * 5 + usage.completion_tokens * 15  # micro-credits at catalog prices
    deadline = time.time() + 5
    while time.time() < deadline:
        after = admin.get(f"/accounts/{acc}/usage").json()["credits"]["charged_micro"]
        if after != before:
            break
        time.sleep(0.1)
    assert after - before == expected


def test_revocation_reaches_the_replica_within_a_second(gateway):
    admin, acc = gateway["admin"], gateway["account"]["id"]
    key = admin.post(f"/accounts/{acc}/keys", json={"name": "short-lived"}).json()
    c = openai.OpenAI(base_url=f"{gateway['base']}/v1", api_key=key["key"], max_retries=0)
    assert c.models.list()
    assert admin.patch(f"/keys/{key['id']}", json={"state": "revoked"}).status_code == 200
    time.sleep(1.0)
    with pytest.raises(openai.AuthenticationError) as err:
        c.models.list()
    assert err.value.body["code"] == "api_key_revoked"


def test_rate_limit_429_with_retry_after(gateway):
    admin, acc = gateway["admin"], gateway["account"]["id"]
    key = admin.post(f"/accounts/{acc}/keys", json={"name": "slow", "limits": {"rpm": 2}}).json()
    c = openai.OpenAI(base_url=f"{gateway['base']}/v1", api_key=key["key"], max_retries=0)
    for _ in range(2):
        c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.RateLimitError) as err:
        c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "rate_limit_exceeded"
    assert int(err.value.response.headers["retry-after"]) >= 1


def test_request_id_appears_in_the_account_logs(gateway, client):
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "log me"}])
    rid = raw.headers["x-trex-request-id"]
    deadline = time.time() + 5
    while time.time() < deadline:
        rows = gateway["admin"].get(f"/accounts/{gateway['account']['id']}/logs?limit=20").json()["data"]
        if any(r["request_id"] == rid for r in rows):
            break
        time.sleep(0.2)
    row = next(r for r in rows if r["request_id"] == rid)
    assert row["provider"] == "alpha" and row["status"] == 200 and row["tokens_out"] > 0
    assert "log me" not in json.dumps(row)


def _requests_total(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("trex_requests_total{"))


def test_metrics_cover_every_ingress_replica(gateway, client):
    http = httpx.Client(base_url=gateway["base"], timeout=10)
    time.sleep(2.5)
    before = _requests_total(http.get("/metrics").text)
    for _ in range(12):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "m"}])
    time.sleep(2.5)  # each replica publishes its snapshot every 2 s
    text = http.get("/metrics").text
    assert "trex_ingress_replicas 2.0" in text
    assert _requests_total(text) - before == 12


def test_responses_api_translated_to_chat(client):
    raw = client.responses.with_raw_response.create(model="gpt-4o-mini", input="hello responses",
                                                    instructions="be brief")
    response = raw.parse()
    assert response.output_text.startswith("Hello from alpha")
    assert response.usage.output_tokens > 0
    assert raw.headers["x-trex-upstream-provider"] == "alpha"


def test_responses_api_stream_typed_events(client):
    kinds, text = [], ""
    with client.responses.stream(model="gpt-4o-mini", input="stream responses") as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert text.startswith("Hello from alpha") and final.output_text == text


def test_responses_api_native_passthrough(client):
    response = client.responses.create(model="native-model", input="native please")
    assert "responses" in response.output_text
    stream = client.responses.create(model="native-model", input="native stream", stream=True)
    assert [e.type for e in stream][-1] == "response.completed"


def test_chat_through_anthropic_provider(client):
    answer = client.chat.completions.create(model="claude-sonnet", messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi claude"}])
    assert answer.choices[0].message.content.startswith("Hello from alpha")
    assert answer.usage.prompt_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="claude-sonnet", stream=True, messages=[{"role": "user", "content": "stream claude"}]) if c.choices)
    assert text.startswith("Hello from alpha")


def test_anthropic_overload_falls_back_to_openai_provider(gateway, client):
    gateway["mocks"]["alpha"].control(fail_next=1, error_status=529)
    raw = client.chat.completions.with_raw_response.create(
        model="claude-sonnet", messages=[{"role": "user", "content": "x"}])
    assert raw.headers["x-trex-upstream-provider"] == "beta"
    assert raw.headers["x-trex-attempts"] == "2"


def test_responses_through_anthropic_provider(client):
    response = client.responses.create(model="claude-sonnet", input="responses to claude")
    assert response.output_text.startswith("Hello from alpha")


def test_client_address_comes_from_the_front_proxy_not_the_client(gateway):
    admin, acc = gateway["admin"], gateway["account"]["id"]
    local = admin.post(f"/accounts/{acc}/keys", json={"risk": {"allowed_ips": ["127.0.0.0/8", "::1/128"]}}).json()
    remote = admin.post(f"/accounts/{acc}/keys", json={"risk": {"allowed_ips": ["203.0.113.0/24"]}}).json()
    spoof = {"X-Forwarded-For": "203.0.113.9"}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
    with httpx.Client(base_url=gateway["base"], timeout=30) as http:
        ok = http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {local['key']}", **spoof})
        assert ok.status_code == 200
        refused = http.post("/v1/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {remote['key']}", **spoof})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "ip_not_allowed"


def test_hot_routes_skip_serves_proxy_for_each_ingress_replicas_data_server(gateway, client):
    """The front proxy sends chat, responses and models straight to the ingress replicas' own data
    servers (web/data_server.py), one per replica, all up; the control surface stays on Serve."""
    from trex_serve.local.front_proxy import admin_socket_path
    from trex_serve.local.front_sync import admin

    def up_servers() -> dict[str, int]:
        """Each data server that is UP, with the requests it has taken (HAProxy's stot column)."""
        state = admin(admin_socket_path(Path(gateway["env"]["TREX_HOME"])), "show stat")
        rows = [line.split(",") for line in state.splitlines() if line.startswith("data,d")]
        return {row[1]: int(row[7]) for row in rows if row[17] == "UP"}

    deadline = time.monotonic() + 30
    while len(up_servers()) < 2:
        assert time.monotonic() < deadline, up_servers()
        time.sleep(0.5)
    before = up_servers()
    with httpx.Client(base_url=gateway["base"], timeout=30) as http:
        hot = http.get("/v1/models", headers={"Authorization": f"Bearer {gateway['key']}"})
    taken = up_servers()
    control = gateway["admin"].get("/accounts")
    assert hot.status_code == 200 and sum(taken.values()) == sum(before.values()) + 1, (before, taken)
    assert control.status_code == 200 and up_servers() == taken  # the control surface: Serve's proxy
    for answer in (hot, control):  # neither announces the stack behind it
        assert not any(s in answer.headers.get("server", "").lower() for s in ("python", "aiohttp", "uvicorn"))
    for _ in range(6):
        done = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
        assert done.choices[0].message.content
    after = up_servers()
    assert all(after[name] > before[name] for name in before), (before, after)


def test_spend_cap_exact_across_two_ingress_replicas(gateway):
    from concurrent.futures import ThreadPoolExecutor

    admin = gateway["admin"]
    acc = admin.post("/accounts", json={"name": "capped", "plan": "free"}).json()
    admin.post(f"/accounts/{acc['id']}/credits", json={"amount": 10, "reason": "cap test"})
    key = admin.post(f"/accounts/{acc['id']}/keys", json={"risk": {"daily_spend_cap": 0.006}}).json()
    body = {"model": "big-model", "max_tokens": 64, "messages": [{"role": "user", "content": "spend"}]}

    def call(_i: int) -> httpx.Response:
        return httpx.post(f"{gateway['base']}/v1/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {key['key']}"})

    # Slow answers keep the 24 reservations in flight together: on a quiet machine the gateway
    # answered each before the client's next thread had sent its request, and nothing reached the cap.
    gateway["mocks"]["alpha"].control(latency_ms=300)
    try:
        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(call, range(24)))
    finally:
        gateway["mocks"]["alpha"].control(latency_ms=0)
    ok = [r for r in answers if r.status_code == 200]
    capped = [r for r in answers if r.status_code == 402]
    assert ok and capped and len(ok) + len(capped) == 24
    assert {r.json()["error"]["code"] for r in capped} == {"spend_limit_exceeded"}
    expected = sum(r.json()["usage"]["prompt_tokens"] * 5 + r.json()["usage"]["completion_tokens"] * 15 for r in ok)
    deadline = time.time() + 5
    while time.time() < deadline:
        charged = admin.get(f"/accounts/{acc['id']}/usage").json()["credits"]["charged_micro"]
        if charged == expected:
            break
        time.sleep(0.2)
    assert charged == expected <= 6000


def test_velocity_guard_suspends_on_every_replica(gateway):
    admin = gateway["admin"]
    acc = admin.post("/accounts", json={"name": "leaky", "plan": "free"}).json()
    admin.post(f"/accounts/{acc['id']}/credits", json={"amount": 10, "reason": "velocity test"})
    key = admin.post(f"/accounts/{acc['id']}/keys",
                     json={"risk": {"velocity": {"window_s": 60, "max_credits": 0.0005}}}).json()
    c = openai.OpenAI(base_url=f"{gateway['base']}/v1", api_key=key["key"], max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        for _ in range(20):
            c.chat.completions.create(model="big-model", max_tokens=16, messages=[{"role": "user", "content": "v"}])
    time.sleep(1.0)
    for _ in range(6):  # HAProxy spreads these over both ingress replicas
        with pytest.raises(openai.AuthenticationError) as err:
            c.models.list()
        assert err.value.body["code"] == "api_key_suspended"
    events = admin.get(f"/accounts/{acc['id']}/risk-events").json()["data"]
    assert any(e["kind"] == "auto_suspended" for e in events)
    assert admin.patch(f"/keys/{key['id']}", json={"state": "active", "risk": None}).status_code == 200
    time.sleep(1.0)
    assert c.models.list()


def test_redeploy_of_a_changed_catalog_under_load_drops_nothing(gateway, tmp_path_factory):
    import threading

    env = gateway["env"]
    path = Path(env["TREX_CATALOG"])
    path.write_text(path.read_text().replace("smart_auto: [gpt-4o-mini]", """  - id: added-later
    candidates:
      - {provider: beta, model: beta-added}
smart_auto: [gpt-4o-mini]"""))
    gateway["mocks"]["alpha"].control(token_interval_ms=50)
    stop, results = threading.Event(), []

    def load(stream: bool) -> None:
        body = {"model": "gpt-4o-mini", "stream": stream, "messages": [{"role": "user", "content": "redeploy"}]}
        with httpx.Client(base_url=gateway["base"], timeout=60) as http:
            while not stop.is_set():
                try:
                    r = http.post("/v1/chat/completions", json=body,
                                  headers={"Authorization": f"Bearer {gateway['key']}"})
                    ok = r.status_code == 200 and (not stream or "data: [DONE]" in r.text)
                    results.append(r.status_code if ok else f"{r.status_code} {r.text[-200:]}")
                except httpx.HTTPError as exc:
                    results.append(f"transport error {exc!r}")
                time.sleep(0.3)  # stay under the plan's 1,000 requests a minute

    threads = [threading.Thread(target=load, args=(i % 2 == 0,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    # As an operator would run it: without repeating the replica count `up` was started with.
    redeploy_env = {k: v for k, v in env.items() if k != "TREX_INGRESS_REPLICAS"}
    done = subprocess.run([sys.executable, "-m", "trex_serve.local.cli", "redeploy"], env=redeploy_env,
                          capture_output=True, text=True, timeout=240)
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    bad = [r for r in results if r != 200]
    assert results and not bad, f"{len(bad)} of {len(results)} requests failed during the redeploy: {bad[:3]}"
    ids = [m["id"] for m in httpx.get(f"{gateway['base']}/v1/models", timeout=10,
                                      headers={"Authorization": f"Bearer {gateway['key']}"}).json()["data"]]
    assert "added-later" in ids
    assert running_replicas(gateway["ray_port"])["Ingress"] == 2  # the count `up` was given survives
    # Old and new ingress replicas listen only in this gateway's own block: a port one of them left is
    # never taken by another gateway on the machine while a stale proxy worker still sends there.
    first, last = json.loads((Path(env["TREX_HOME"]) / "gateway.json").read_text())["ingress_ports"]
    ports = _ingress_ports(Path(env["TREX_HOME"]))
    assert len({p for p in ports if first <= p < last}) >= 2, (ports, first, last)
    assert not any(30000 <= p < 31000 for p in ports), ports  # Serve's range shared by every cluster


def _ingress_ports(home: Path) -> set[int]:
    import psutil

    session = json.loads((home / "gateway.json").read_text())["ray_session"]
    ports = set()
    for conn in psutil.net_connections("tcp"):
        if conn.status != psutil.CONN_LISTEN or not conn.pid:
            continue
        try:
            ours = os.getsid(conn.pid) == session and "Ingress" in " ".join(psutil.Process(conn.pid).cmdline())
        except (OSError, psutil.Error):
            continue
        if ours:
            ports.add(conn.laddr.port)
    return ports


def _sdk(gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway['base']}/v1", api_key=key, max_retries=0)


def _code_of(call) -> tuple[int, str]:
    try:
        call()
    except openai.APIStatusError as exc:
        return exc.status_code, exc.body["code"]
    return 200, ""


def test_every_admission_code_through_the_sdk(gateway):
    admin = gateway["admin"]
    acc = admin.post("/accounts", json={"name": "codes", "plan": "free"}).json()
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
    for state, expected in [("inactive", "api_key_inactive"), ("suspended", "api_key_suspended")]:
        key = admin.post(f"/accounts/{acc['id']}/keys", json={}).json()
        admin.patch(f"/keys/{key['id']}", json={"state": state})
        time.sleep(0.3)
        assert _code_of(lambda k=key: _sdk(gateway, k["key"]).chat.completions.create(**chat)) == (401, expected)
    key = admin.post(f"/accounts/{acc['id']}/keys", json={"limits": {"concurrency": 1}}).json()
    c = _sdk(gateway, key["key"])
    assert _code_of(lambda: c.chat.completions.create(model="byok-model", messages=chat["messages"])) == (
        424, "provider_binding_missing")
    admin.patch(f"/accounts/{acc['id']}", json={"subscription_state": "canceled"})
    time.sleep(0.3)
    assert _code_of(lambda: c.chat.completions.create(**chat)) == (402, "subscription_inactive")
    admin.patch(f"/accounts/{acc['id']}", json={"subscription_state": "active", "state": "suspended"})
    time.sleep(0.3)
    assert _code_of(lambda: c.chat.completions.create(**chat)) == (401, "account_suspended")
    admin.patch(f"/accounts/{acc['id']}", json={"state": "active"})
    time.sleep(0.3)
    assert _code_of(lambda: c.chat.completions.create(**chat)) == (200, "")


def test_concurrency_limit_429_and_no_leaked_slot(gateway):
    from concurrent.futures import ThreadPoolExecutor

    admin = gateway["admin"]
    acc = admin.post("/accounts", json={"name": "conc", "plan": "free"}).json()
    key = admin.post(f"/accounts/{acc['id']}/keys", json={"limits": {"concurrency": 2}}).json()
    gateway["mocks"]["alpha"].control(latency_ms=400)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "c"}]}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _i: httpx.post(f"{gateway['base']}/v1/chat/completions", json=body, timeout=30,
                                                      headers={"Authorization": f"Bearer {key['key']}"}), range(8)))
    gateway["mocks"]["alpha"].control(latency_ms=0)
    codes = sorted(r.status_code for r in answers)
    assert codes.count(200) == 2 and codes.count(429) == 6
    assert all(r.json()["error"]["code"] == "concurrency_limit_exceeded" and r.headers["retry-after"]
               for r in answers if r.status_code == 429)
    for _ in range(3):  # every slot came back
        assert httpx.post(f"{gateway['base']}/v1/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {key['key']}"}).status_code == 200


def test_a_key_at_concurrency_one_gets_every_request_sent_after_its_answer(gateway):
    """The settlement of a whole answer finishes after the answer has left; its slot must
    still be free for a request the client sends the moment it has read that answer."""
    admin = gateway["admin"]
    acc = admin.post("/accounts", json={"name": "one-at-a-time", "plan": "free"}).json()
    admin.post(f"/accounts/{acc['id']}/credits", json={"amount": 10, "reason": "conc-1 test"})
    key = admin.post(f"/accounts/{acc['id']}/keys", json={"limits": {"concurrency": 1}}).json()
    c = openai.OpenAI(base_url=f"{gateway['base']}/v1", api_key=key["key"], max_retries=0)
    for i in range(40):
        model = "big-model" if i % 2 else "gpt-4o-mini"  # credits and quota alike
        c.chat.completions.create(model=model, max_tokens=8, messages=[{"role": "user", "content": "n"}])


def test_billing_quota_credits_grant_downgrade_and_free_failures(gateway):
    admin = gateway["admin"]
    acc = admin.post("/accounts", json={"name": "billing", "plan": "free"}).json()
    key = admin.post(f"/accounts/{acc['id']}/keys", json={}).json()
    c = _sdk(gateway, key["key"])
    msgs = [{"role": "user", "content": "bill me"}]
    refused = _code_of(lambda: c.chat.completions.create(model="big-model", messages=msgs))
    assert refused == (402, "insufficient_credits")
    admin.post(f"/accounts/{acc['id']}/credits", json={"amount": 1, "reason": "grant"})
    raw = c.chat.completions.with_raw_response.create(model="big-model", messages=msgs)
    usage = raw.parse().usage
    expected = usage.prompt_tokens * 5 + usage.completion_tokens * 15
    # A fallback is billed once (for the answer that was served); a failed request costs nothing.
    gateway["mocks"]["alpha"].control(fail_next=1, error_status=503)
    fb = c.chat.completions.with_raw_response.create(model="big-model", messages=msgs)
    assert fb.headers["x-trex-attempts"] == "2"
    fb_usage = fb.parse().usage
    expected += fb_usage.prompt_tokens * 5 + fb_usage.completion_tokens * 15
    for m in gateway["mocks"].values():
        m.control(fail_next=1, error_status=500)
    assert _code_of(lambda: c.chat.completions.create(model="big-model", messages=msgs))[0] == 502
    # Read your writes: the usage read right after the answers already counts every charge.
    usage_now = admin.get(f"/accounts/{acc['id']}/usage").json()
    assert usage_now["credits"]["charged_micro"] == expected
    assert usage_now["credits"]["balance_micro"] == usage_now["live_balance_micro"] == 1_000_000 - expected
    # The SQL ledger catches up with the live balance (the ledger stream is drained behind the answers).
    deadline = time.time() + 5
    while time.time() < deadline:
        usage_now = admin.get(f"/accounts/{acc['id']}/usage").json()
        if usage_now["credits"]["ledger_balance_micro"] == usage_now["live_balance_micro"]:
            break
        time.sleep(0.2)
    assert usage_now["credits"]["ledger_balance_micro"] == usage_now["live_balance_micro"] == 1_000_000 - expected
    quota_before = usage_now["quota"]["requests_used"]
    poor = admin.post("/accounts", json={"name": "poor", "plan": "free"}).json()
    down = admin.post(f"/accounts/{poor['id']}/keys", json={"billing_policy": "downgrade"}).json()
    d = _sdk(gateway, down["key"]).chat.completions.with_raw_response.create(model="big-model", messages=msgs)
    assert d.headers["x-trex-downgraded"] == "1" and d.headers["x-trex-billing"] == "quota"
    assert admin.get(f"/accounts/{acc['id']}/usage").json()["quota"]["requests_used"] == quota_before


def test_daily_quota_exhaustion_429_with_reset(gateway):
    admin = gateway["admin"]
    acc = admin.post("/accounts", json={"name": "tiny", "plan": "tiny"}).json()
    c = _sdk(gateway, admin.post(f"/accounts/{acc['id']}/keys", json={}).json()["key"])
    msgs = [{"role": "user", "content": "q"}]
    for _ in range(2):
        c.chat.completions.create(model="smart-auto", messages=msgs)
    with pytest.raises(openai.RateLimitError) as err:
        c.chat.completions.create(model="smart-auto", messages=msgs)
    assert err.value.body["code"] == "insufficient_quota"
    assert 1 <= int(err.value.response.headers["retry-after"]) <= 86400
    assert admin.get(f"/accounts/{acc['id']}/usage").json()["quota"]["requests_left"] == 0



def _charged(gateway) -> int:
    return gateway["admin"].get(f"/accounts/{gateway['account']['id']}/usage").json()["credits"]["charged_micro"]


def _charge_of(gateway, call) -> int:
    before = _charged(gateway)
    call()
    deadline = time.time() + 5
    while time.time() < deadline and _charged(gateway) == before:
        time.sleep(0.1)
    return _charged(gateway) - before


WIRE = Path(__file__).parent.parent / "fixtures" / "wire"


@pytest.mark.parametrize("stream", [False, True])
def test_openai_format_cached_tokens_billed_at_the_cache_price(gateway, client, stream):
    usage = json.loads((WIRE / "openai_chat_cached.json").read_text())["usage"]
    gateway["mocks"]["alpha"].control(usage=usage)

    def call():
        answer = client.chat.completions.create(model="cached-model", stream=stream,
                                                messages=[{"role": "user", "content": "cached?"}])
        if stream:
            assert "".join(c.choices[0].delta.content or "" for c in answer if c.choices)
        else:
            assert answer.usage.prompt_tokens_details.cached_tokens == 1920
    # cached-model: input 2, cache read 0.5, output 8 credits per 1M tokens
    assert _charge_of(gateway, call) == 86 * 2 + 1920 // 2 + 300 * 8


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_format_cache_reads_and_writes_billed_per_class(gateway, client, stream):
    usage = json.loads((WIRE / "anthropic_message_cached.json").read_text())["usage"]
    gateway["mocks"]["alpha"].control(usage=usage)

    def call():
        extra = {"stream_options": {"include_usage": True}} if stream else {}
        answer = client.chat.completions.create(model="cached-claude", stream=stream, **extra,
                                                messages=[{"role": "user", "content": "cached?"}])
        if stream:
            final = [c.usage for c in answer if c.usage]
            assert final and final[-1].prompt_tokens == 33200
        else:
            assert answer.usage.prompt_tokens_details.cached_tokens == 30000
    # 1,200 x 3 + 30,000 x 0.30 + 1,500 x 3.75 + 500 x 6 + 500 x 15 micro-credits
    assert _charge_of(gateway, call) == 3600 + 9000 + 5625 + 3000 + 7500
