"""Hardening: bad input never reaches an upstream, never costs anything, never answers 5xx.

Every rejected request must answer a 4xx in the OpenAI envelope with ``X-Trex-Request-Id`` and
leave no trace on the account: quota, RPM, in-flight leases, credit balance and request logs
unchanged, and no upstream call made.
"""

from __future__ import annotations

import json
import math
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.gateway import OP, account, new_key

CHAT = "/v1/chat/completions"
RESP = "/v1/responses"


def assert_envelope(r, lo=400, hi=499):
    assert lo <= r.status_code <= hi, (r.status_code, r.text[:500])
    rid = r.headers.get("x-trex-request-id")
    assert rid and rid.startswith("req_"), dict(r.headers)
    body = r.json()
    err = body["error"]
    for field in ("message", "type", "code", "param"):
        assert field in err, body
    assert err["trex"]["request_id"] == rid
    return err


class State:
    """A snapshot of everything a request could change for one account and key."""

    def __init__(self, gw, acc, key):
        self.gw, self.acc, self.key = gw, acc, key
        self.first_window = math.floor(time.time() / 60)

    async def _rpm(self, c) -> int:
        """The key's RPM counts summed over every minute window since this snapshot's first: a
        window that turns between two snapshots changes nothing, a request counted changes it."""
        now = math.floor(time.time() / 60)
        return sum([await c.rpm_used(self.key["id"], now=w * 60.0) for w in range(self.first_window, now + 1)])

    async def snap(self):
        c = self.gw.runtime.counters
        await self.gw.runtime.logs.flush_once()
        await self.gw.runtime.ledger.flush_once()
        logs = (await self.gw.get(f"/admin/v1/accounts/{self.acc['id']}/logs?limit=1000", headers=OP)).json()
        stats = {n: m.stats()["requests"] for n, m in self.gw.mocks.items()}
        return {"quota": await c.quota_usage(self.acc["id"]), "inflight": await c.inflight(self.key["id"]),
                "rpm": await self._rpm(c), "balance": await c.get_balance(self.acc["id"]),
                "ledger": self.gw.runtime.repo.ledger_sum(self.acc["id"]),
                "logs": {row["request_id"]: row for row in logs["data"]}, "upstream": stats}


def assert_unchanged(before, after):
    """Counters, balance, ledger and upstream traffic unchanged. Requests refused after the key was
    authenticated leave a log row on the account (that is the audit trail): a 4xx, zero tokens,
    zero credits. Requests refused before authentication leave none."""
    assert {k: v for k, v in after.items() if k != "logs"} == {k: v for k, v in before.items() if k != "logs"}
    assert after["inflight"] == 0
    for rid, row in after["logs"].items():
        if rid in before["logs"]:
            continue
        assert 400 <= row["status"] < 500, row
        assert not row.get("credits_charged") and not row.get("tokens_in") and not row.get("tokens_out"), row


@pytest.fixture
async def victim(gw):
    acc = await account(gw, credits=10)
    key = await new_key(gw, acc)
    # One good request first so the balance is loaded into Redis and the key is cached.
    r = await gw.post(CHAT, json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                      headers={"Authorization": f"Bearer {key['key']}"})
    assert r.status_code == 200, r.text
    return acc, key, State(gw, acc, key)


def auth(key):
    return {"Authorization": f"Bearer {key['key']}", "Content-Type": "application/json"}


def _deep(n: int) -> bytes:
    return b'{"model":"gpt-4o-mini","messages":' + b"[" * n + b"]" * n + b"}"


RAW_BODIES = {
    "invalid_utf8": b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"\xff\xfe\xfa"}]}',
    "lone_surrogate": b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"\\ud800"}]}',
    "huge_float": b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}],"temperature":1e400}',
    "huge_max_tokens": b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}],"max_tokens":'
                       + str(2**70).encode() + b"}",
    "negative_huge_n": b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}],"n":-'
                       + str(2**70).encode() + b"}",
    "nan": b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}],"max_tokens":NaN}',
    "deep_10k": _deep(10_000),
    "empty": b"",
    "null": b"null",
    "array": b"[]",
    "string": b'"hello"',
    "truncated": b'{"model":"gpt-4o-mini","messages":[',
    "trailing_garbage": b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}]} xyz',
    "dup_keys_last_invalid": b'{"model":"gpt-4o-mini","model":123,"messages":[{"role":"user","content":"x"}]}',
    "dup_messages_last_empty": b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}],"messages":[]}',
    "bom": b'\xef\xbb\xbf{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}],"n":0}',
}

GOOD = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
WRONG_TYPES = [
    ("model", v) for v in (None, 1, 1.5, True, [], {}, "")
] + [
    ("messages", v) for v in (None, 1, "hi", {}, [], [1], ["x"], [None], [{}], [{"content": "x"}],
                              [{"role": 1, "content": "x"}], [{"role": None}])
] + [
    ("stream", v) for v in (1, "true", [], {}, 0)
] + [
    ("stream_options", v) for v in (1, "x", [], True)
] + [
    ("max_tokens", v) for v in (0, -1, 1.5, "ten", [], {}, 10**12)
] + [
    ("max_completion_tokens", v) for v in (0, -5, "x", 2.5, 10**12)
] + [
    ("n", v) for v in (0, 129, "two", [])
] + [
    ("trex", v) for v in (1, "x", [], {"routing": 1}, {"routing": {"fallbacks": "x"}},
                          {"routing": {"fallbacks": [{"provider": "alpha"}]}}, {"unknown": 1},
                          {"routing": {"allow_fallbacks": "maybe"}},
                          {"routing": {"fallbacks": [{"provider": "a", "model": "b"}] * 9}})
]

RESP_WRONG_TYPES = [
    ("model", v) for v in (None, 1, [], "")
] + [
    ("input", v) for v in (1, {}, [1], [{"role": 1}], True)
] + [
    ("instructions", v) for v in (1, [], {})
] + [
    ("stream", v) for v in ([], {})
] + [
    ("max_output_tokens", v) for v in (0, -1, "x", 10**12)
]


async def test_raw_bodies_are_4xx_and_change_nothing(gw, victim):
    acc, key, state = victim
    before = await state.snap()
    for name, raw in RAW_BODIES.items():
        r = await gw.post(CHAT, content=raw, headers=auth(key))
        err = assert_envelope(r)
        assert r.status_code == 400, (name, r.text)
        assert err["code"] == "invalid_request_error", (name, err)
    assert await state.snap() == before  # refused while parsing, before authentication: no trace at all
    for name, raw in RAW_BODIES.items():
        # Some of these become valid Responses bodies: only "never a 5xx, always the envelope" holds.
        r = await gw.post(RESP, content=raw.replace(b'"messages"', b'"input"'), headers=auth(key))
        assert r.status_code < 500 and r.headers.get("x-trex-request-id"), (name, r.text[:300])
        if r.status_code != 200:
            assert_envelope(r)


async def test_wrong_types_for_every_main_field(gw, victim):
    acc, key, state = victim
    before = await state.snap()
    for field, value in WRONG_TYPES:
        r = await gw.post(CHAT, json={**GOOD, field: value}, headers=auth(key))
        assert r.status_code == 400, (field, value, r.text)
        err = assert_envelope(r)
        assert err["param"] and re.split(r"[.\[]", err["param"])[0] == field, (field, value, err)
    for field, value in RESP_WRONG_TYPES:
        r = await gw.post(RESP, json={"model": "gpt-4o-mini", "input": "hi", field: value}, headers=auth(key))
        assert r.status_code == 400, (field, value, r.text)
        assert_envelope(r)
    assert_unchanged(before, await state.snap())


MALFORMED_MESSAGES = [
    (CHAT, {"model": "gpt-4o-mini", "messages": [{"role": "user"}]}, "messages[0].content"),
    (CHAT, {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "x"}, {"role": "wizard",
                                                                                     "content": "x"}]},
     "messages[1].role"),
    (CHAT, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]},
     "messages[1].content"),
    (CHAT, {"model": "gpt-4o-mini", "messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id"),
    (CHAT, {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages[0].content[0].text"),
    (RESP, {"model": "gpt-4o-mini", "input": [{"role": "user"}]}, "input[0].content"),
    (RESP, {"model": "gpt-4o-mini", "input": [{"type": "function_call_output", "output": "x"}]},
     "input[0].call_id"),
]


@pytest.mark.parametrize("path,body,param", MALFORMED_MESSAGES)
async def test_malformed_messages_are_400_naming_the_path_and_change_nothing(gw, victim, path, body, param):
    acc, key, state = victim
    before = await state.snap()
    r = await gw.post(path, json=body, headers=auth(key))
    assert r.status_code == 400, r.text
    err = assert_envelope(r)
    assert (err["code"], err["type"], err["param"]) == ("invalid_request_error", "invalid_request_error", param)
    assert r.headers["x-trex-attempts"] == "0"
    # Refused while validating, before authentication: not admitted, not charged, not sent, not logged.
    assert await state.snap() == before


async def test_well_formed_tool_conversation_with_unknown_fields_is_served(gw, victim):
    acc, key, state = victim
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}, "x_new": 1}
    body = {"model": "gpt-4o-mini", "some_new_param": {"a": [1]}, "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "rules", "cache_hint": "new"}]},
        {"role": "user", "content": "what is f?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"}]}
    r = await gw.post(CHAT, json=body, headers=auth(key))
    assert r.status_code == 200, r.text
    sent = gw.mocks["alpha"].stats()["last_body"]
    assert sent["some_new_param"] == {"a": [1]} and sent["messages"][2]["tool_calls"][0]["x_new"] == 1


async def test_responses_stream_is_a_strict_boolean(gw, victim):
    acc, key, state = victim
    r = await gw.post(RESP, json={"model": "gpt-4o-mini", "input": "hi", "stream": "yes"}, headers=auth(key))
    assert r.status_code == 400 and assert_envelope(r)["param"] == "stream"


async def test_duplicate_keys_last_one_wins(gw, victim):
    acc, key, state = victim
    # Both valid: the last value is the one used (orjson semantics), the request is served once.
    raw = b'{"model":"no-such-model","model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}]}'
    r = await gw.post(CHAT, content=raw, headers=auth(key))
    assert r.status_code == 200, r.text
    raw = b'{"model":"gpt-4o-mini","model":"no-such-model","messages":[{"role":"user","content":"x"}]}'
    before = await state.snap()
    r = await gw.post(CHAT, content=raw, headers=auth(key))
    assert assert_envelope(r)["code"] == "model_not_found"
    # A refused model costs nothing; its log row (a 404 with the account) is the only trace.
    assert_unchanged(before, await state.snap())


async def test_oversized_body_is_413(gw, victim):
    acc, key, state = victim
    limit = gw.runtime.settings.max_body_bytes
    big = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * (limit + 10)}]}
    before = await state.snap()
    r = await gw.post(CHAT, json=big, headers=auth(key))
    assert assert_envelope(r)["code"] == "request_too_large" and r.status_code == 413
    # Without a Content-Length (chunked): the streaming read stops at the limit.

    async def chunks():
        for _ in range(limit // 65536 + 2):
            yield b"x" * 65536

    r = await gw.post(CHAT, content=chunks(), headers=auth(key))
    assert r.status_code == 413 and assert_envelope(r)["code"] == "request_too_large"
    # A lying Content-Length.
    r = await gw.post(CHAT, content=b"{}", headers={**auth(key), "Content-Length": "abc"})
    assert_envelope(r)
    r = await gw.post(RESP, json={"model": "gpt-4o-mini", "input": "x" * (limit + 10)}, headers=auth(key))
    assert r.status_code == 413 and assert_envelope(r)["code"] == "request_too_large"
    assert_unchanged(before, await state.snap())


async def test_oversized_and_garbage_auth_headers(gw, victim):
    acc, key, state = victim
    before = await state.snap()
    for value in ("Bearer " + "k" * 200_000, "Bearer", "Basic abc", "Bearer " + key["key"] + "x" * 70_000,
                  "Bearer sk-\u00e9\u00e8", "Bearer " + key["key"][:-1]):
        r = await gw.post(CHAT, json=GOOD, headers=[(b"authorization", value.encode("utf-8"))])
        assert r.status_code in (401, 429), r.text
        assert_envelope(r)
    r = await gw.get("/v1/models", headers={"Authorization": "Bearer " + "m" * 100_000})
    assert_envelope(r)
    after = await state.snap()
    assert after == before  # refused before authentication: not even a log row on the account


INJECTIONS = [
    "sk-abc\r\nX-Injected: 1",
    "sk-abc\nX-Injected: 1",
    "sk-abc\r",
    "sk-\x00nul",
    "sk-\u00e9t\u00e9",      # non-ASCII (latin-1 on the wire)
    "sk-" + "\u2603",        # not latin-1 at all: sent as UTF-8 bytes
    "k" * 100_000,           # far over any upstream's header limit
]


async def _inject(gw, key, value):
    raw_headers = [(b"authorization", f"Bearer {key['key']}".encode()),
                   (b"content-type", b"application/json"),
                   (b"x-upstream-api-key", value.encode("utf-8"))]
    return await gw.post(CHAT, content=json.dumps(GOOD).encode(), headers=raw_headers)


async def test_upstream_key_header_injection_is_refused(gw, victim):
    acc, key, state = victim
    before = await state.snap()
    for value in INJECTIONS:
        r = await _inject(gw, key, value)
        assert r.status_code == 400, (value[:40], r.status_code, r.text[:300])
        err = assert_envelope(r)
        assert err["param"] == "X-Upstream-Api-Key", err
        assert "X-Injected" not in r.text and value[:20] not in r.text
    after = await state.snap()
    assert after["upstream"] == before["upstream"], "a malformed provider key must never be sent upstream"
    assert after["quota"] == before["quota"] and after["inflight"] == 0
    assert after["balance"] == before["balance"] and after["ledger"] == before["ledger"]


async def test_upstream_key_header_injection_is_refused_before_admission(gw, victim):
    acc, key, state = victim
    before = await state.snap()
    r = await _inject(gw, key, "sk-abc\r\nX-Injected: 1")
    assert r.status_code == 400 and r.headers["x-trex-attempts"] == "0"
    after = await state.snap()
    assert after["rpm"] == before["rpm"] and after["logs"] == before["logs"]


DEEP_VALID = {
    # Valid JSON (orjson reads up to 1024 levels) whose nesting is only inside free-form fields.
    "chat_content": (CHAT, {**GOOD, "messages": [{"role": "user", "content": "x", "meta": "N"}]}),
    "chat_extra": (CHAT, {**GOOD, "metadata": "N"}),
    "responses_input": (RESP, {"model": "gpt-4o-mini", "input": [{"role": "user", "content": "N"}]}),
}


def _nest(body: dict, depth: int) -> bytes:
    return json.dumps(body).replace('"N"', "[" * depth + "]" * depth).encode()


@pytest.mark.parametrize("case", sorted(DEEP_VALID))
async def test_deep_but_parseable_json_is_not_5xx(gw, victim, case):
    acc, key, state = victim
    path, body = DEEP_VALID[case]
    r = await gw.post(path, content=_nest(body, 600), headers=auth(key))
    assert r.status_code < 500, r.text[:300]
    assert_envelope(r)


# ---- fuzzing ---------------------------------------------------------------------------------

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                          max_leaves=12)
FIELDS = ["model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "n", "trex",
          "input", "instructions", "max_output_tokens", "temperature"]
fuzz_body = st.one_of(
    json_value,
    st.fixed_dictionaries({}, optional={f: json_value for f in FIELDS}),
    st.fixed_dictionaries({"model": st.sampled_from(["gpt-4o-mini", "smart-auto", "nope", ""])},
                          optional={f: json_value for f in FIELDS if f != "model"}),
)


def _collect(strategy, n: int) -> list:
    out: list = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def gen(value):
        out.append(value)

    gen()
    return out


@pytest.mark.parametrize("path", [CHAT, RESP])
async def test_fuzzed_json_bodies_never_5xx(gw, victim, path):
    acc, key, state = victim
    for body in _collect(fuzz_body, 120):
        r = await gw.post(path, content=json.dumps(body).encode(), headers=auth(key))
        assert r.status_code < 500, (body, r.status_code, r.text[:300])
        assert r.headers.get("x-trex-request-id"), (body, dict(r.headers))
        if r.status_code != 200 and not r.headers.get("content-type", "").startswith("text/event-stream"):
            assert_envelope(r, 400, 499)
    assert await gw.runtime.counters.inflight(key["id"]) == 0


async def test_fuzzed_raw_bytes_never_5xx(gw, victim):
    acc, key, state = victim
    before = await state.snap()
    for raw in _collect(st.binary(max_size=200), 100):
        r = await gw.post(CHAT, content=raw, headers=auth(key))
        assert r.status_code < 500 and r.headers.get("x-trex-request-id"), (raw, r.text)
        if r.status_code != 200:
            assert_envelope(r)
    after = await state.snap()
    assert after["quota"] == before["quota"] and after["inflight"] == 0 and after["balance"] == before["balance"]


async def test_admin_api_bad_input_is_4xx(gw):
    bodies = [b"\xff\xfe", b"[]", b"null", b'{"name": 1}', b'{"name":"x","plan":{"$ne":1}}', b"{" * 5000,
              b'{"name":"x","risk":{"allowed_ips":["999.1.1.1/99"]}}', b'{"name":"' + b"n" * 300 + b'"}']
    for raw in bodies:
        r = await gw.post("/admin/v1/accounts", content=raw, headers={**OP, "Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (raw[:40], r.status_code, r.text[:300])
        assert r.json()["error"]["code"]
    acc = await account(gw)
    for raw in (b'{"amount": 1e400}', b'{"amount": "NaN"}', b'{"amount": -1}', b'{"amount": ' + b"9" * 400 + b"}",
                b'{"amount": 1e300}'):
        r = await gw.post(f"/admin/v1/accounts/{acc['id']}/credits", content=raw,
                          headers={**OP, "Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (raw[:40], r.status_code, r.text[:300])
    r = await gw.get(f"/admin/v1/accounts/{acc['id']}/logs?limit=" + "9" * 400, headers=OP)
    assert r.status_code == 400
    r = await gw.get("/admin/v1/accounts/" + "x" * 10_000, headers=OP)
    assert 400 <= r.status_code < 500
