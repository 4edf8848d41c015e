"""OpenTelemetry traces of the request path, following the GenAI semantic conventions.

Off unless OpenTelemetry's own variables ask for it: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_ENDPOINT`` (OTLP over HTTP; ``OTEL_SDK_DISABLED=true`` or
``OTEL_TRACES_EXPORTER=none`` turn it off again). The SDK itself reads the rest as it defines them:
``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` / ``_ARG``,
``OTEL_EXPORTER_OTLP_*_HEADERS`` / ``_TIMEOUT``, ``OTEL_BSP_*``. With tracing off no SDK object is
built and every hook returns after one ``None`` check, so the request path pays nothing.

One request, one trace (ingress process, then pool process)::

    POST /v1/chat/completions   SERVER  gen_ai.*, trex.request_id, trex.billing, trex.attempts
      trex.admission            INTERNAL
      chat <upstream model>     CLIENT  one per attempt: provider, model, status, retry reason
                                        (``responses <model>``, ``messages <model>`` on those routes)
        trex.pool <provider>    SERVER  in the pool replica; its context goes on to the provider
      trex.settlement           INTERNAL

``GET /v1/models[/id]`` is one SERVER span of its own (no attempt, no record).

Spans leave through a ``BatchSpanProcessor`` (a background thread), never on the request path.
No prompt or completion text, no keys: attributes are ids, names, counts and codes only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

DEFAULT_SERVICE_NAME = "trex-serve"
ROUTES = {"chat": "/v1/chat/completions", "responses": "/v1/responses", "messages": "/v1/messages"}

_tracer: Tracer | None = None
_provider: Any = None  # the SDK's TracerProvider once set up
_propagator = TraceContextTextMapPropagator()  # W3C traceparent / tracestate
_NOOP = contextlib.nullcontext()


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether OpenTelemetry's environment asks for traces."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def enabled() -> bool:
    return _tracer is not None


def setup(component: str) -> bool:
    """Build the SDK (OTLP/HTTP exporter behind a batch processor) when the environment asks for it.
    Idempotent per process; ``component`` (``ingress`` or ``pool``) becomes ``trex.component``."""
    if _tracer is not None:
        return True
    if not wanted():
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"trex.component": component, "process.pid": os.getpid()})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        # Neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES named the service.
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER(_ARG)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    use(provider)
    return True


def use(provider: Any) -> None:
    """Trace with ``provider`` (tests pass one with an in-memory exporter); ``None`` turns tracing off."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer("trex_serve") if provider is not None else None


def flush(timeout_ms: int = 5000) -> None:
    if _provider is not None:
        _provider.force_flush(timeout_ms)


# ---- ingress side ----------------------------------------------------------------------------------


class RequestTrace:
    """The spans of one request in the ingress, carried on the pipeline's ``Call``."""

    __slots__ = ("span", "context", "attempt", "last_failure")

    def __init__(self, span: Any) -> None:
        self.span = span
        self.context = set_span_in_context(span)
        self.attempt: Any = None
        self.last_failure: str | None = None


def begin(call: Any, carrier: Mapping[str, str] | None) -> None:
    """Open the request's server span, continuing the caller's W3C ``traceparent`` if it sent one."""
    if _tracer is None:
        return
    parent = _propagator.extract(carrier) if carrier else None
    route = ROUTES.get(call.api, "/v1/" + call.api)
    span = _tracer.start_span(f"POST {route}", context=parent, kind=SpanKind.SERVER, attributes={
        "http.request.method": "POST", "http.route": route, "url.path": route,
        "client.address": call.client_ip, "gen_ai.operation.name": "chat",
        "trex.request_id": call.request_id, "trex.api": call.api})
    call.trace = RequestTrace(span)


@contextlib.contextmanager
def listing(call: Any, route: str, carrier: Mapping[str, str] | None) -> Any:
    """The server span of a read that leaves no request record (``GET /v1/models``): opened and
    closed here; the caller sets the status through :func:`answered`."""
    if _tracer is None:
        yield None
        return
    parent = _propagator.extract(carrier) if carrier else None
    span = _tracer.start_span(f"GET {route}", context=parent, kind=SpanKind.SERVER, attributes={
        "http.request.method": "GET", "http.route": route, "client.address": call.client_ip,
        "trex.request_id": call.request_id, "trex.api": call.api})
    try:
        yield span
    finally:
        span.end()


def answered(span: Any, status: int) -> None:
    if span is None or not span.is_recording():
        return
    span.set_attribute("http.response.status_code", status)
    if status >= 400:
        span.set_attribute("error.type", str(status))  # HTTP semantic conventions: the status itself
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR, str(status)))


class _Step:
    """A child span over one step of the request (admission, settlement)."""

    __slots__ = ("call", "name", "span")

    def __init__(self, call: Any, name: str) -> None:
        self.call = call
        self.name = name

    def __enter__(self) -> Any:
        self.span = _tracer.start_span(self.name, context=self.call.trace.context)  # type: ignore[union-attr]
        return self.span

    def __exit__(self, _typ: Any, exc: BaseException | None, _tb: Any) -> None:
        span, ticket = self.span, self.call.ticket
        if not span.is_recording():
            span.end()
            return
        if ticket is not None:
            span.set_attribute("trex.billing", ticket.billing)
            if ticket.downgraded:
                span.set_attribute("trex.downgraded", True)
        if exc is not None:
            code = getattr(exc, "code", None) or type(exc).__name__
            span.set_attribute("error.type", code)
            span.set_status(Status(StatusCode.ERROR, code))
        span.end()


def step(call: Any, name: str) -> Any:
    """``with tracing.step(call, "trex.admission"): ...`` (a shared no-op when untraced)."""
    if call.trace is None:
        return _NOOP
    return _Step(call, name)


def attempt_begin(call: Any, provider: str, model: str, req: Any) -> None:
    """Open the span of one upstream attempt and put its context on the hop request, so the pool
    replica (and through it the provider) continues this trace."""
    trace = call.trace
    if trace is None:
        return
    attrs: dict[str, Any] = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": provider,
                             "gen_ai.request.model": model, "gen_ai.request.stream": call.stream,
                             "trex.attempt": len(call.attempts) + 1, "trex.request_id": call.request_id}
    if trace.last_failure:
        attrs["trex.retry_reason"] = trace.last_failure
    # Named after the client's API (``chat``, ``responses``, ``messages``), so a Responses request's
    # attempts are told apart from a chat request's in a trace view.
    trace.attempt = _tracer.start_span(f"{call.api} {model}", context=trace.context,  # type: ignore[union-attr]
                                       kind=SpanKind.CLIENT, attributes=attrs)
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=set_span_in_context(trace.attempt))
    req.trace_headers = carrier


def attempt_end(call: Any, open_stream: bool = False) -> None:
    """Close the attempt span from the attempt's record (``call.attempts[-1]``); a stream being
    relayed keeps its attempt open until the request finishes."""
    trace = call.trace
    if trace is None or trace.attempt is None:
        return
    record = call.attempts[-1]
    span = trace.attempt
    error = record.get("error")
    if error:
        trace.last_failure = error
    if span.is_recording():  # an unsampled span takes no attributes: skip building them
        span.set_attribute("http.response.status_code", record["status"])
        if error:
            span.set_attribute("error.type", error)
            span.set_status(Status(StatusCode.ERROR, error))
    if not open_stream:
        span.end()
        trace.attempt = None


def attempt_skipped(call: Any, reason: str) -> None:
    """Close an attempt span that reached no upstream (every managed key of the provider unusable)."""
    trace = call.trace
    if trace is None or trace.attempt is None:
        return
    trace.last_failure = reason
    if trace.attempt.is_recording():
        trace.attempt.set_attribute("error.type", reason)
        trace.attempt.set_status(Status(StatusCode.ERROR, reason))
    trace.attempt.end()
    trace.attempt = None


def finish(call: Any, rec: Any) -> None:
    """Close the request's spans from its ``RequestRecord``; called once, when the request is done."""
    trace = call.trace
    if trace is None:
        return
    call.trace = None
    if trace.attempt is not None:
        trace.attempt.end()
    span = trace.span
    if not span.is_recording():
        span.end()
        return
    attrs: dict[str, Any] = {
        "http.response.status_code": rec.status, "gen_ai.request.model": rec.model_requested or "",
        "gen_ai.request.stream": rec.stream, "trex.attempts": rec.attempts, "trex.fallbacks": rec.fallbacks,
        "gen_ai.usage.input_tokens": rec.tokens_in, "gen_ai.usage.output_tokens": rec.tokens_out,
        "gen_ai.usage.cache_read.input_tokens": rec.tokens_cache_read,
        "gen_ai.usage.cache_creation.input_tokens": rec.tokens_cache_write + rec.tokens_cache_write_1h,
        "trex.usage.cache_write_1h_tokens": rec.tokens_cache_write_1h,
        "trex.usage.reasoning_tokens": rec.tokens_reasoning,
    }
    if rec.provider:
        attrs["gen_ai.provider.name"] = rec.provider
        attrs["gen_ai.response.model"] = rec.model_served or ""
    if rec.billing:
        attrs["trex.billing"] = rec.billing
        attrs["trex.credits_charged_micro"] = rec.credits_charged
    if rec.account_id:
        attrs["trex.account_id"] = rec.account_id
        attrs["trex.key_id"] = rec.key_id or ""
    if rec.ttfb_ms is not None:
        attrs["gen_ai.response.time_to_first_chunk"] = rec.ttfb_ms / 1000.0
    span.set_attributes(attrs)
    if rec.status >= 400:
        error = rec.error_code or str(rec.status)
        span.set_attribute("error.type", error)
        if rec.status >= 500 or rec.status == 499:
            span.set_status(Status(StatusCode.ERROR, error))
    span.end()


# ---- pool side (the pool's server span is hop/pool_tracing.py, which reads the hop's headers) -----


def tracer() -> Tracer | None:
    return _tracer


def extract(carrier: Mapping[str, str]) -> Any:
    """The W3C trace context a caller sent, for a span that continues it."""
    return _propagator.extract(carrier)


def inject(headers: dict[str, str]) -> None:
    """Add the current span's ``traceparent`` to an outgoing request's headers."""
    if _tracer is not None:
        _propagator.inject(headers)
