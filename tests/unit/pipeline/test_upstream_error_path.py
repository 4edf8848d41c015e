"""The data path, without Ray, with real HTTP to mock upstream processes: an upstream's non-retryable
4xx reaches the client whole (status, type, code, param, message, the provider's header, the key
cut out), 5xx still falls back, and catalog auth styles (Azure's api-key and api-version, Google's
x-goog-api-key) really reach the upstream."""

from __future__ import annotations

import pytest

from tests.fakes import data_path_client
from trex_serve.catalog import load_catalog

KEY = "sk-live-5e1f0c9a7b3d2e4f6a8b"
TEMPERATURE = {"error": {"message": "Invalid value for 'temperature': expected a number between 0 and 2 "
                                    "(key {key}).", "type": "invalid_request_error", "param": "temperature",
                         "code": "invalid_value"}}


def write_catalog(path, mocks):
    a, b = mocks["alpha"].url, mocks["beta"].url
    timeouts = "timeout_s: 2\n    first_byte_timeout_s: 1.5\n    connect_timeout_s: 1"
    path.write_text(f"""
providers:
  - name: alpha
    base_url: {a}/v1
    auth: none
    {timeouts}
  - name: beta
    base_url: {b}/v1
    auth: none
    {timeouts}
  - name: claude
    base_url: {a}/v1
    format: anthropic
    auth: none
    {timeouts}
  - name: azure
    base_url: {b}/v1?deployment=gpt-4o&api-version=2020-01-01
    auth: none
    auth_header: api-key
    query: {{api-version: 2024-10-21}}
    {timeouts}
  - name: gemini
    base_url: {b}/v1
    auth: none
    auth_header: x-goog-api-key
    {timeouts}
models:
  - id: gpt-4o-mini
    candidates: [{{provider: alpha, model: alpha-mini}}, {{provider: beta, model: beta-mini}}]
  - id: claude-sonnet
    candidates: [{{provider: claude, model: claude-sonnet-4-5}}, {{provider: beta, model: beta-mini}}]
  - id: azure-gpt
    candidates: [{{provider: azure, model: gpt-4o}}]
  - id: gemini-flash
    candidates: [{{provider: gemini, model: gemini-2.5-flash}}]
plans:
  - name: free
    rpm: 1000
    concurrency: 50
""")
    return path


@pytest.fixture(params=["fastapi", "direct"])
async def gateway(mocks, tmp_path, request):
    for m in mocks.values():
        m.reset()
    catalog = load_catalog(write_catalog(tmp_path / "catalog.yaml", mocks))
    async with data_path_client(catalog, front=request.param) as client:
        yield client


async def ask(gateway, model="gpt-4o-mini", key=KEY):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "temperature": 7}
    return await gateway.post("/v1/chat/completions", json=body, headers={"X-Upstream-Api-Key": key})


async def test_openai_400_reaches_the_client_whole_with_the_key_cut_out(gateway, mocks):
    mocks["alpha"].control(fail_next=1, error_status=400, error_body=TEMPERATURE)
    r = await ask(gateway)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", "invalid_value", "temperature")
    assert err["message"] == "Invalid value for 'temperature': expected a number between 0 and 2 (key [redacted])."
    assert KEY[:12] not in r.text and KEY[-12:] not in r.text
    assert r.headers["x-trex-upstream-provider"] == "alpha"
    assert err["trex"]["request_id"] == r.headers["x-trex-request-id"]
    assert [(a["provider"], a["status"]) for a in err["trex"]["attempts"]] == [("alpha", 400)]
    assert mocks["beta"].stats()["requests"] == 0, "a 4xx of the caller's making is not retried elsewhere"
    assert [s.success for s in gateway.gate.settlements] == [False]


async def test_every_string_field_the_upstream_quotes_the_key_in_is_redacted(gateway, mocks):
    quoting = {"error": {"message": "bad key {key}", "type": "invalid_request_error",
                         "param": "{key}", "code": "key_{key}"}}
    mocks["alpha"].control(fail_next=1, error_status=401, error_body=quoting)
    r = await ask(gateway)
    assert r.status_code == 401
    err = r.json()["error"]
    assert (err["message"], err["param"], err["code"]) == ("bad key [redacted]", "[redacted]", "key_[redacted]")
    assert KEY[:12] not in r.text and KEY[-12:] not in r.text


async def test_a_null_code_stays_null_and_the_record_still_says_what_failed(gateway, mocks):
    body = {"error": {"message": "Unrecognized request argument supplied: foo", "type": "invalid_request_error",
                      "param": None, "code": None}}
    mocks["alpha"].control(fail_next=1, error_status=400, error_body=body)
    r = await ask(gateway)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] is None and err["param"] is None and err["type"] == "invalid_request_error"
    assert err["message"] == "Unrecognized request argument supplied: foo"
    assert [rec.error_code for rec in gateway.records] == ["invalid_request_error"]


@pytest.mark.parametrize("status,error,expected", [
    (404, {"type": "not_found_error", "message": "model: claude-x"},
     ("invalid_request_error", "model_not_found", "model")),
    (401, {"type": "authentication_error", "message": "invalid x-api-key"},
     ("authentication_error", "invalid_api_key", None)),
    (400, {"type": "invalid_request_error", "message": "messages.1.content: Input should be a valid list"},
     ("invalid_request_error", "invalid_request_error", None)),
])
async def test_anthropic_errors_reach_the_client_in_openai_terms(gateway, mocks, status, error, expected):
    mocks["alpha"].control(fail_next=1, error_status=status, error_body={"type": "error", "error": error})
    r = await ask(gateway, "claude-sonnet")
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["type"], err["code"], err["param"]) == expected
    assert err["message"] == error["message"]
    assert r.headers["x-trex-upstream-provider"] == "claude"
    assert mocks["beta"].stats()["requests"] == 0


@pytest.mark.parametrize("status", [500, 429])
async def test_retryable_statuses_still_fall_back_whatever_the_body_says(gateway, mocks, status):
    mocks["alpha"].control(fail_next=1, error_status=status, error_body=TEMPERATURE)
    r = await ask(gateway)
    assert r.status_code == 200, r.text
    assert r.headers["x-trex-upstream-provider"] == "beta" and r.headers["x-trex-attempts"] == "2"


async def test_azure_style_key_header_and_api_version_reach_the_upstream(gateway, mocks):
    r = await ask(gateway, "azure-gpt")
    assert r.status_code == 200, r.text
    seen = mocks["beta"].stats()
    headers = {k.lower(): v for k, v in seen["last_headers"].items()}
    assert headers["api-key"] == KEY and "authorization" not in headers
    assert seen["last_query"] == {"deployment": "gpt-4o", "api-version": "2024-10-21"}


async def test_gemini_style_key_header_reaches_the_upstream(gateway, mocks):
    r = await ask(gateway, "gemini-flash")
    assert r.status_code == 200, r.text
    seen = mocks["beta"].stats()
    headers = {k.lower(): v for k, v in seen["last_headers"].items()}
    assert headers["x-goog-api-key"] == KEY and "authorization" not in headers
    assert seen["last_query"] == {}
