"""Traces of the data path (HTTP app → pipeline → relay hop → pool server → mock upstreams), caught
by the SDK's in-memory exporter: span tree, GenAI attributes, W3C context in and out, nothing secret."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.fakes import data_path_client
from tests.helpers import write_catalog
from trex_serve.catalog import load_catalog
from trex_serve.observability import tracing

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
PROMPT = "the secret recipe is 42 cloves"
UPSTREAM_KEY = "sk-caller-own-key-0123456789"


@pytest.fixture
def exporter():
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.use(provider)
    yield memory
    tracing.use(None)
    provider.shutdown()


@pytest.fixture
async def gateway(mocks, tmp_path):
    for m in mocks.values():
        m.reset()
    async with data_path_client(load_catalog(write_catalog(tmp_path / "catalog.yaml", mocks))) as client:
        yield client


def body(**extra):
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}], **extra}


def by_name(spans) -> dict[str, list]:
    out: dict[str, list] = {}
    for s in spans:
        out.setdefault(s.name, []).append(s)
    return out


def assert_nothing_secret(spans) -> None:
    for s in spans:
        for value in s.attributes.values():
            assert PROMPT not in str(value) and UPSTREAM_KEY not in str(value), (s.name, value)


async def test_fallback_is_one_trace_continuing_the_callers_traceparent(gateway, mocks, exporter):
    mocks["alpha"].control(fail_next=1, error_status=503)
    r = await gateway.post("/v1/chat/completions", json=body(),
                           headers={"traceparent": TRACEPARENT, "X-Upstream-Api-Key": UPSTREAM_KEY})
    assert r.status_code == 200 and r.headers["x-trex-attempts"] == "2"
    spans = exporter.get_finished_spans()
    names = by_name(spans)
    assert {s.context.trace_id for s in spans} == {int(CLIENT_TRACE, 16)}

    [server] = names["POST /v1/chat/completions"]
    assert server.kind == SpanKind.SERVER and server.parent.span_id == int(CLIENT_SPAN, 16)
    a = server.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "gpt-4o-mini"
    assert a["gen_ai.provider.name"] == "beta" and a["gen_ai.response.model"] == "beta-mini"
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert a["trex.request_id"] == r.headers["x-trex-request-id"]
    assert a["trex.billing"] == "quota" and a["trex.attempts"] == 2 and a["trex.fallbacks"] == 1
    assert a["http.response.status_code"] == 200

    [admission] = names["trex.admission"]
    [settlement] = names["trex.settlement"]
    for child in (admission, settlement):
        assert child.parent.span_id == server.context.span_id
    first, second = sorted(names["chat alpha-mini"] + names["chat beta-mini"], key=lambda s: s.start_time)
    assert first.kind == second.kind == SpanKind.CLIENT
    assert first.parent.span_id == second.parent.span_id == server.context.span_id
    assert first.attributes["gen_ai.provider.name"] == "alpha" and first.attributes["trex.attempt"] == 1
    assert first.attributes["http.response.status_code"] == 503 and first.attributes["error.type"] == "http_503"
    assert first.status.status_code == StatusCode.ERROR
    assert second.attributes["gen_ai.provider.name"] == "beta" and second.attributes["trex.attempt"] == 2
    assert second.attributes["trex.retry_reason"] == "http_503"
    assert second.attributes["http.response.status_code"] == 200

    # The pool replica's span continues each attempt, and its context reaches the provider.
    pools = {s.attributes["gen_ai.provider.name"]: s for s in names["trex.pool alpha"] + names["trex.pool beta"]}
    assert pools["alpha"].parent.span_id == first.context.span_id
    assert pools["beta"].parent.span_id == second.context.span_id
    assert pools["beta"].kind == SpanKind.SERVER
    assert pools["beta"].attributes["server.address"] == "127.0.0.1"
    assert pools["beta"].attributes["gen_ai.usage.output_tokens"] > 0
    assert pools["alpha"].attributes["error.type"] == "http_503"
    sent = mocks["beta"].stats()["last_traceparent"]
    assert sent == f"00-{CLIENT_TRACE}-{pools['beta'].context.span_id:016x}-01"
    assert_nothing_secret(spans)


async def test_stream_keeps_its_attempt_open_until_the_last_byte(gateway, exporter):
    r = await gateway.post("/v1/chat/completions", json=body(stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200 and b"[DONE]" in r.content
    names = by_name(exporter.get_finished_spans())
    [server] = names["POST /v1/chat/completions"]
    [attempt] = names["chat alpha-mini"]
    [pool] = names["trex.pool alpha"]
    assert server.parent is None  # no traceparent sent: a new trace
    assert server.attributes["gen_ai.request.stream"] is True
    assert server.attributes["gen_ai.usage.output_tokens"] > 0
    assert "gen_ai.response.time_to_first_chunk" in server.attributes
    assert attempt.end_time >= pool.end_time  # the attempt covers the relayed stream
    assert names["trex.settlement"][0].start_time >= pool.end_time


async def test_rejection_and_upstream_failure_mark_the_spans(gateway, mocks, exporter):
    r = await gateway.post("/v1/chat/completions", json=body(model="no-such-model"))
    assert r.status_code == 404
    for m in mocks.values():
        m.control(fail_next=1, error_status=500)
    r = await gateway.post("/v1/responses", json={"model": "gpt-4o-mini", "input": PROMPT})
    assert r.status_code == 502
    spans = exporter.get_finished_spans()
    names = by_name(spans)
    [refused] = names["POST /v1/chat/completions"]
    assert refused.attributes["error.type"] == "model_not_found"
    assert refused.attributes["trex.attempts"] == 0
    [failed] = names["POST /v1/responses"]
    [admission] = names["trex.admission"]  # the refused request never reached admission
    assert admission.parent.span_id == failed.context.span_id
    assert failed.attributes["error.type"] == "upstream_unavailable"
    assert failed.status.status_code == StatusCode.ERROR and failed.attributes["trex.attempts"] == 2
    attempts = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert len(attempts) == 2 and all(s.attributes["error.type"] == "http_500" for s in attempts)
    assert all(s.name.startswith("responses ") for s in attempts)  # named after the client's API, not chat
    assert_nothing_secret(spans)


async def test_model_list_is_traced(gateway, exporter):
    r = await gateway.get("/v1/models", headers={"traceparent": TRACEPARENT})
    assert r.status_code == 200
    [span] = by_name(exporter.get_finished_spans())["GET /v1/models"]
    assert span.kind == SpanKind.SERVER and span.parent.span_id == int(CLIENT_SPAN, 16)
    assert span.attributes["http.response.status_code"] == 200
    r = await gateway.get("/v1/models/no-such-model")
    assert r.status_code == 404
    [missing] = by_name(exporter.get_finished_spans())["GET /v1/models/{model}"]
    assert missing.attributes["error.type"] == "404"


def test_environment_decides(monkeypatch):
    assert not tracing.wanted({})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"})
    assert not tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"})
    assert not tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_TRACES_EXPORTER": "none"})
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert tracing.setup("ingress") is False and not tracing.enabled()


async def test_untraced_requests_build_no_spans(gateway):
    assert not tracing.enabled()
    r = await gateway.post("/v1/chat/completions", json=body(), headers={"traceparent": TRACEPARENT})
    assert r.status_code == 200
