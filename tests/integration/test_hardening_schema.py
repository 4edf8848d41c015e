"""Hardening: schema-driven fuzzing (schemathesis) of the gateway's own OpenAPI: no 5xx, ever.

The spec is the app's own ``/openapi.json`` (``build_http_app(...).openapi()``), which declares the
request bodies of the generation endpoints (trex_serve/web/openapi.py), so schemathesis generates
bodies from what the gateway publishes. Cases are generated with hypothesis (bounded,
derandomized) and sent through the in-process gateway.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from tests.integration.gateway import account, new_key
from trex_serve.web.http_app import build_http_app

schemathesis = pytest.importorskip("schemathesis")

MAX_EXAMPLES = 30
BODIES = {"/v1/chat/completions": "ChatCompletionBody", "/v1/responses": "ResponsesBody"}


def gateway_openapi() -> dict:
    async def _none():
        return None

    return build_http_app(_none).openapi()


def test_the_app_declares_the_generation_bodies():
    spec = gateway_openapi()
    for path, model in BODIES.items():
        body = spec["paths"][path]["post"]["requestBody"]
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert "messages" in spec["components"]["schemas"][model]["properties"] or path.endswith("responses")
        answers = spec["paths"][path]["post"]["responses"]
        assert {"200", "4XX", "5XX"} <= set(answers) and "text/event-stream" in answers["200"]["content"]
    roles = spec["components"]["schemas"]["ChatCompletionBody"]["properties"]["messages"]["items"]
    assert set(roles["discriminator"]["mapping"]) == {"system", "developer", "user", "assistant", "tool",
                                                      "function"}


def _cases(operation, mode) -> list:
    out: list = []
    strategy = operation.as_strategy(generation_mode=mode) if mode is not None else operation.as_strategy()

    @settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def gen(case):
        out.append(case)

    gen()
    return out


def _modes():
    try:
        from schemathesis.generation import GenerationMode
    except ImportError:  # pragma: no cover - older schemathesis
        return [None]
    return [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]


SCHEMA = schemathesis.openapi.from_dict(gateway_openapi())
OPERATIONS = [(path, method.upper()) for path, item in SCHEMA.raw_schema["paths"].items() for method in item]


@pytest.mark.parametrize("path,method", OPERATIONS)
async def test_openapi_operations_never_5xx(gw, path, method):
    acc = await account(gw, credits=5)
    key = await new_key(gw, acc)
    operation = SCHEMA[path][method]
    sent = 0
    for mode in _modes():
        try:
            cases = _cases(operation, mode)
        except Exception:  # noqa: BLE001 - e.g. nothing to negate for a parameterless GET
            if mode is None or "POSITIVE" in str(mode):
                raise
            continue
        for case in cases:
            headers = {"Authorization": f"Bearer {key['key']}", **{k: v for k, v in (case.headers or {}).items()
                                                                     if k.lower() != "authorization"}}
            kwargs = {}
            if type(case.body).__name__ != "NotSet":
                kwargs["json"] = case.body
            try:
                r = await gw.request(method, case.formatted_path, headers=headers, params=case.query or None,
                                     **kwargs)
            except (TypeError, ValueError, UnicodeEncodeError):
                continue  # a case the HTTP client itself cannot put on the wire
            sent += 1
            assert r.status_code < 500, (method, case.formatted_path, case.body, r.status_code, r.text[:300])
            if r.status_code in (404, 405) and r.text.startswith('{"detail"'):
                continue  # routing errors: see test_routing_errors_use_the_envelope
            if path.startswith("/v1/"):
                assert r.headers.get("x-trex-request-id"), (case.formatted_path, r.status_code, r.text)
                if r.status_code >= 400 and path.startswith("/v1/messages"):
                    # Anthropic's API answers refusals in its own shape (type + error.type)
                    assert r.json()["type"] == "error" and r.json()["error"]["type"], r.text
                elif r.status_code >= 400:
                    assert r.json()["error"]["code"]
    assert sent > 0
    assert await gw.runtime.counters.inflight(key["id"]) == 0


@pytest.mark.parametrize("method,path", [("GET", "/v1/nope"), ("GET", "/v1/chat/completions"),
                                         ("GET", "/v1/models/a%0Ab")])
async def test_routing_errors_use_the_envelope(mocks, tmp_path, redis_url, key_prefix, method, path):
    from tests.integration.test_hardening_outages import gateway

    async with gateway(mocks, tmp_path, f"sqlite:///{tmp_path / 'trex.db'}", redis_url, key_prefix) as gw:
        await account(gw)  # (the gw fixture's teardown can stall when a test does nothing at all)
        r = await gw.request(method, path, headers={"Authorization": "Bearer x"})
    assert 400 <= r.status_code < 500
    assert r.headers.get("x-trex-request-id")
    assert r.json()["error"]["code"]
