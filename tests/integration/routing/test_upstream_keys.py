"""Several managed keys per provider, end to end over real HTTP: the in-process gateway (two of
them sharing Redis and the database stand for two ingress replicas), its pool server, and mock
upstreams that record which credential they received and answer 429/401 per key."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack

import httpx
import pytest

from tests.integration.gateway import OP, account, new_key
from trex_serve.catalog import load_catalog
from trex_serve.local.standalone import standalone_gateway
from trex_serve.routing.upstream_keys import KeyStore, rendezvous_order
from trex_serve.settings import Settings

SECRETS = {"key-a": "sk-test-aaaa-0123456789", "key-b": "sk-test-bbbb-0123456789",
           "key-c": "sk-test-cccc-0123456789"}


def _catalog(path, mocks, rpm: dict[str, int] | None = None, tpm: dict[str, int] | None = None):
    rpm, tpm = rpm or {}, tpm or {}

    def budget(k: str) -> str:
        return (f", rpm: {rpm[k]}" if k in rpm else "") + (f", tpm: {tpm[k]}" if k in tpm else "")

    path.write_text(f"""
providers:
  - name: pooled
    base_url: {mocks['alpha'].url}/v1
    timeout_s: 5
    keys:
      - {{env: TREX_T16_KEY_A, id: key-a{budget('key-a')}}}
      - {{env: TREX_T16_KEY_B, id: key-b{budget('key-b')}}}
      - {{env: TREX_T16_KEY_C, id: key-c, weight: 2{budget('key-c')}}}
  - name: beta
    base_url: {mocks['beta'].url}/v1
    auth: none
    timeout_s: 5
models:
  - id: gpt-4o-mini
    candidates:
      - {{provider: pooled, model: alpha-mini}}
      - {{provider: beta, model: beta-mini}}
smart_auto: [gpt-4o-mini]
plans:
  - name: free
    rpm: 100000
    tpm: 100000000
    concurrency: 64
    burst_concurrency: 64
    daily_quota: {{requests: 1000000, tokens: 1000000000}}
""")
    return load_catalog(path)


@pytest.fixture
def key_env(monkeypatch):
    for key_id, secret in SECRETS.items():
        monkeypatch.setenv(f"TREX_T16_KEY_{key_id[-1].upper()}", secret)


class Replicas:
    def __init__(self, clients, catalog, mocks):
        self.clients, self.catalog, self.mocks = clients, catalog, mocks
        self.gw = clients[0]

    async def accounts(self, n: int) -> list[tuple[str, str]]:
        out = []
        for _ in range(n):
            acc = await account(self.gw)
            out.append((acc["id"], (await new_key(self.gw, acc))["key"]))
        return out

    async def accounts_including(self, key_id: str, n: int) -> list[tuple[str, str]]:
        """``n`` accounts, more if needed until one of them starts on ``key_id`` (ids are random)."""
        out = await self.accounts(n)
        while not any(self.first_key(a) == key_id for a, _ in out):
            out += await self.accounts(1)
        return out

    def first_key(self, account_id: str) -> str:
        return rendezvous_order(account_id, self.catalog.provider("pooled").keys)[0].key_id

    def order(self, account_id: str) -> list[str]:
        return [k.key_id for k in rendezvous_order(account_id, self.catalog.provider("pooled").keys)]


async def _replicas(stack, tmp_path, mocks, redis_url, key_prefix, count=1, rpm=None, tpm=None) -> Replicas:
    for m in mocks.values():
        m.reset()
    catalog = _catalog(tmp_path / "catalog.yaml", mocks, rpm, tpm)
    settings = Settings(catalog_path="", database_url=f"sqlite:///{tmp_path / 'trex.db'}", redis_url=redis_url,
                        admin_token="op", secret_key="test-secret")
    clients = []
    for _ in range(count):
        gateway = await stack.enter_async_context(standalone_gateway(settings, catalog, counters_prefix=key_prefix))
        client = await stack.enter_async_context(httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gateway.app), base_url="http://gw", timeout=30))
        client.runtime = gateway.runtime
        clients.append(client)
    return Replicas(clients, catalog, mocks)


async def _chat(client, key):
    return await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                             json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


def _received(mock) -> dict[str, int]:
    by_secret = mock.stats()["by_key"]
    return {kid: by_secret.get(secret, 0) for kid, secret in SECRETS.items()}


async def _metrics(client) -> str:
    text = (await client.get("/metrics")).text
    for secret in SECRETS.values():
        assert secret not in text and secret[-8:] not in text
    return text


async def test_each_account_sticks_to_its_weighted_key_while_healthy(mocks, tmp_path, redis_url, key_prefix, key_env):
    async with AsyncExitStack() as stack:
        r = await _replicas(stack, tmp_path, mocks, redis_url, key_prefix)
        for account_id, key in await r.accounts(6):
            expected = f"Bearer {SECRETS[r.first_key(account_id)]}"
            for _ in range(4):
                resp = await _chat(r.gw, key)
                assert resp.status_code == 200, resp.text
                assert resp.headers["X-Trex-Upstream-Provider"] == "pooled"
                assert mocks["alpha"].stats()["last_auth"] == expected
        assert sum(_received(mocks["alpha"]).values()) == 24


async def test_a_key_answering_429_cools_alone_and_its_accounts_move_without_an_error(
        mocks, tmp_path, redis_url, key_prefix, key_env):
    async with AsyncExitStack() as stack:
        r = await _replicas(stack, tmp_path, mocks, redis_url, key_prefix)
        accounts = await r.accounts_including("key-c", 8)
        mocks["alpha"].control(key_faults={SECRETS["key-c"]: {"status": 429, "retry_after": 30}})
        for account_id, key in accounts:
            for _ in range(3):
                resp = await _chat(r.gw, key)
                assert resp.status_code == 200, resp.text
                assert resp.headers["X-Trex-Upstream-Provider"] == "pooled"  # another key, not another provider
                used = next(k for k, s in SECRETS.items() if mocks["alpha"].stats()["last_auth"] == f"Bearer {s}")
                order = [k for k in r.order(account_id) if k != "key-c"]
                assert used == order[0]
        # Only the request that met the 429 reached key-c: its Retry-After kept every later one away.
        assert _received(mocks["alpha"])["key-c"] == 1
        text = await _metrics(r.gw)
        assert 'trex_upstream_key_state{key="key-c",provider="pooled",state="cooling"} 1.0' in text
        assert 'trex_upstream_key_state{key="key-a",provider="pooled",state="active"} 1.0' in text
        assert 'trex_upstream_key_spills_total{key="key-c",provider="pooled",reason="cooling"}' in text
        assert 'trex_upstream_key_requests_total{key="key-c",provider="pooled",status="429"} 1.0' in text


async def test_a_key_answering_401_is_taken_out_counted_audited_and_logged(
        mocks, tmp_path, redis_url, key_prefix, key_env, caplog):
    caplog.set_level(logging.INFO)
    async with AsyncExitStack() as stack:
        r = await _replicas(stack, tmp_path, mocks, redis_url, key_prefix)
        accounts = await r.accounts_including("key-a", 6)
        mocks["alpha"].control(key_faults={SECRETS["key-a"]: {"status": 401}})
        for _account_id, key in accounts:
            for _ in range(2):
                resp = await _chat(r.gw, key)
                assert resp.status_code == 200, resp.text
                assert resp.headers["X-Trex-Upstream-Provider"] == "pooled"
        assert _received(mocks["alpha"])["key-a"] == 1  # the one request that met the 401; then it is out
        text = await _metrics(r.gw)
        assert 'trex_upstream_key_out_total{key="key-a",provider="pooled"} 1.0' in text
        assert 'trex_upstream_key_state{key="key-a",provider="pooled",state="out"} 1.0' in text
        audit = (await r.gw.get("/admin/v1/audit?limit=20", headers=OP)).json()["data"]
        rows = [a for a in audit if a["action"] == "upstream_key.out"]
        assert [(a["target_id"], a["after"]["status"]) for a in rows] == [("pooled/key-a", 401)]
        assert any("key-a" in rec.getMessage() and "taken out" in rec.getMessage() for rec in caplog.records)
        logged = "\n".join(rec.getMessage() for rec in caplog.records) + repr(audit)
        assert not any(secret in logged for secret in SECRETS.values())


async def test_only_when_every_key_is_cooling_does_the_request_fall_back(
        mocks, tmp_path, redis_url, key_prefix, key_env):
    async with AsyncExitStack() as stack:
        r = await _replicas(stack, tmp_path, mocks, redis_url, key_prefix)
        [(_account_id, key)] = await r.accounts(1)
        mocks["alpha"].control(key_faults={s: {"status": 429, "retry_after": 30} for s in SECRETS.values()})
        first = await _chat(r.gw, key)
        assert first.status_code == 200 and first.headers["X-Trex-Upstream-Provider"] == "beta"
        assert first.headers["X-Trex-Attempts"] == "4"  # the three keys, then the next provider
        second = await _chat(r.gw, key)
        assert second.status_code == 200 and second.headers["X-Trex-Upstream-Provider"] == "beta"
        assert second.headers["X-Trex-Attempts"] == "1"  # every key still cooling: not even tried
        assert sum(_received(mocks["alpha"]).values()) == 3


async def test_with_no_other_provider_a_pool_of_cooling_keys_answers_503_with_retry_after(
        mocks, tmp_path, redis_url, key_prefix, key_env):
    async with AsyncExitStack() as stack:
        r = await _replicas(stack, tmp_path, mocks, redis_url, key_prefix)
        [(_account_id, key)] = await r.accounts(1)
        mocks["alpha"].control(key_faults={s: {"status": 429, "retry_after": 20} for s in SECRETS.values()})
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                "trex": {"routing": {"allow_fallbacks": False}}}
        first = await r.gw.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body)
        assert first.status_code == 502, first.text  # three keys tried, three 429s
        assert [a["key"] for a in first.json()["error"]["trex"]["attempts"]] == r.order(_account_id)
        assert first.headers["Retry-After"] == "20"
        resp = await r.gw.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body)
        assert resp.status_code == 503, resp.text  # every key cooling: nothing tried
        assert resp.json()["error"]["code"] == "upstream_unavailable"
        assert 1 <= int(resp.headers["Retry-After"]) <= 21


async def test_rpm_budget_is_never_exceeded_at_the_upstream_under_32_clients_across_two_replicas(
        mocks, tmp_path, redis_url, key_prefix, key_env):
    budgets = {"key-a": 4, "key-b": 4, "key-c": 8}
    async with AsyncExitStack() as stack:
        r = await _replicas(stack, tmp_path, mocks, redis_url, key_prefix, count=2, rpm=budgets)
        mocks["alpha"].control(key_rpm={SECRETS[k]: v for k, v in budgets.items()})
        accounts = await r.accounts(8)

        async def client(i: int) -> list[httpx.Response]:
            gw = r.clients[i % 2]
            key = accounts[i % len(accounts)][1]
            return [await _chat(gw, key) for _ in range(3)]

        answers = [resp for batch in await asyncio.gather(*(client(i) for i in range(32))) for resp in batch]
        assert [a.status_code for a in answers] == [200] * 96  # no client saw an error
        assert mocks["alpha"].stats()["rpm_refused"] == {}  # the upstream never had to refuse
        assert _received(mocks["alpha"]) == budgets  # every key used up to its budget, exactly
        served = [a.headers["X-Trex-Upstream-Provider"] for a in answers]
        assert served.count("pooled") == 16 and served.count("beta") == 80
        text = await _metrics(r.clients[1])
        assert 'trex_upstream_key_rpm_used{key="key-c",provider="pooled"} 8.0' in text


async def test_tpm_budget_reserves_the_estimate_and_is_trued_up_to_real_usage(redis_url, key_prefix):
    import redis.asyncio as aioredis

    from trex_serve.catalog import UpstreamKey

    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        store = KeyStore(client, key_prefix)
        key = UpstreamKey(env="X", id="k1", tpm=100)
        assert (await store.pick("p", [key], "r1", 40)).key == key
        assert (await store.pick("p", [key], "r2", 40)).key == key
        refused = await store.pick("p", [key], "r3", 40)
        assert refused.key is None and refused.skipped == (("k1", "tpm"),) and refused.wait_s > 0
        await store.used_tokens("p", "k1", "r1", 10)  # r1 really used 10 tokens
        assert (await store.pick("p", [key], "r3", 40)).key == key
        # A rolling minute: use leaves the window 60 s after its pick, never earlier.
        slow = UpstreamKey(env="X", id="k2", rpm=2, tpm=100)
        assert (await store.pick("p", [slow], "s1", 60, now=1000.0)).key == slow
        assert (await store.pick("p", [slow], "s2", 30, now=1030.0)).key == slow
        assert (await store.pick("p", [slow], "s3", 30, now=1059.0)).skipped == (("k2", "rpm"),)
        late = await store.pick("p", [slow], "s3", 50, now=1060.5)  # s1 left: 30 of 100 used, 1 of 2 requests
        assert late.key == slow
        assert (await store.pick("p", [slow], "s4", 1, now=1061.0)).skipped == (("k2", "rpm"),)
    finally:
        await client.aclose()


async def test_operator_lists_key_states_and_reinstates_a_key_that_was_taken_out(
        mocks, tmp_path, redis_url, key_prefix, key_env):
    async with AsyncExitStack() as stack:
        r = await _replicas(stack, tmp_path, mocks, redis_url, key_prefix)
        accounts = await r.accounts_including("key-a", 4)
        on_a = next(k for a, k in accounts if r.first_key(a) == "key-a")
        mocks["alpha"].control(key_faults={SECRETS["key-a"]: {"status": 403}})
        assert (await _chat(r.gw, on_a)).status_code == 200
        assert (await r.gw.get("/admin/v1/upstream-keys")).status_code == 401  # operator only
        listed = (await r.gw.get("/admin/v1/upstream-keys", headers=OP)).json()["data"]
        assert not any(secret in repr(listed) for secret in SECRETS.values())
        states = {row["id"]: (row["state"], row["configured"], row["weight"]) for row in listed}
        assert states == {"key-a": ("out", True, 1.0), "key-b": ("active", True, 1.0),
                          "key-c": ("active", True, 2.0)}
        missing = await r.gw.post("/admin/v1/upstream-keys/pooled/nope/reinstate", headers=OP)
        assert missing.status_code == 404
        mocks["alpha"].control(key_faults={})  # the operator fixed the key at the provider
        back = await r.gw.post("/admin/v1/upstream-keys/pooled/key-a/reinstate", headers=OP)
        assert back.json() == {"provider": "pooled", "id": "key-a", "state": "active", "was_cooling_or_out": True}
        before = _received(mocks["alpha"])["key-a"]
        assert (await _chat(r.gw, on_a)).status_code == 200
        assert _received(mocks["alpha"])["key-a"] == before + 1  # the account is back on its own key
        audit = (await r.gw.get("/admin/v1/audit?limit=10", headers=OP)).json()["data"]
        assert [(a["actor"], a["action"]) for a in audit if a["target_id"] == "pooled/key-a"] == [
            ("operator", "upstream_key.reinstate"), ("system", "upstream_key.out")]


async def test_a_stream_on_a_budgeted_key_moves_off_a_429_and_its_tpm_is_trued_up_to_the_usage(
        mocks, tmp_path, redis_url, key_prefix, key_env):
    import redis.asyncio as aioredis

    async with AsyncExitStack() as stack:
        r = await _replicas(stack, tmp_path, mocks, redis_url, key_prefix, tpm={k: 100000 for k in SECRETS})
        accounts = await r.accounts_including("key-b", 2)
        account_id, key = next((a, k) for a, k in accounts if r.first_key(a) == "key-b")
        mocks["alpha"].control(key_faults={SECRETS["key-b"]: {"status": 429, "retry_after": 30}})
        resp = await r.gw.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                               json={"model": "gpt-4o-mini", "stream": True, "max_tokens": 500,
                                     "stream_options": {"include_usage": True},
                                     "messages": [{"role": "user", "content": "stream please"}]})
        assert resp.status_code == 200 and resp.headers["X-Trex-Upstream-Provider"] == "pooled"
        assert resp.headers["X-Trex-Attempts"] == "2" and "data: [DONE]" in resp.text
        usage = [line for line in resp.text.splitlines() if '"usage":{' in line][-1]
        used = sum(int(usage.split(f'"{f}":')[1].split(",")[0].split("}")[0])
                   for f in ("prompt_tokens", "completion_tokens"))
        whole = await r.gw.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                json={"model": "gpt-4o-mini", "max_tokens": 300,
                                      "messages": [{"role": "user", "content": "whole please"}]})
        assert whole.status_code == 200
        whole_used = whole.json()["usage"]["total_tokens"]
        second = r.order(account_id)[1]
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            logged = await client.hvals(f"{key_prefix}uk:pooled:{second}:tpmv")
            total = await client.get(f"{key_prefix}uk:pooled:{second}:tpms")
        finally:
            await client.aclose()
        # Not the 500+ and 300+ tokens reserved at the picks: what the upstream reported.
        assert sorted(int(v) for v in logged) == sorted([used, whole_used])
        assert int(total) == used + whole_used < 300
