"""The pool replica's server span for one hop request: it continues the ingress's attempt span
(its W3C context came on the hop) and carries what the hop's headers say (provider, model, usage).
Here rather than in observability/tracing.py, so tracing needs nothing from the hop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.trace import SpanKind, Status, StatusCode

from trex_serve.hop import contract as hop
from trex_serve.observability import tracing
from trex_serve.providers.usage import Usage


async def relayed(handler: Callable[[Any], Awaitable[Any]], request: Any, providers: Mapping[str, Any],
                  headers: Mapping[str, str]) -> Any:
    """Run the pool's relay handler inside a server span that continues the ingress's attempt span.
    ``headers`` are the hop's (the request's, case-insensitive); the provider's base URL gives
    ``server.address``. While it runs the span is current, so `tracing.inject` hands it to the upstream."""
    tracer = tracing.tracer()
    if tracer is None:
        return await handler(request)
    provider_name = headers.get(hop.H_PROVIDER, "")
    model = headers.get(hop.H_MODEL, "")
    attrs: dict[str, Any] = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": provider_name,
                             "gen_ai.request.model": model, "trex.request_id": headers.get(hop.H_REQUEST_ID, ""),
                             "gen_ai.request.stream": headers.get(hop.H_STREAM) == "1"}
    provider = providers.get(provider_name)
    if provider is not None:
        url = urlsplit(provider.base_url)
        attrs["server.address"] = url.hostname or ""
        if url.port:
            attrs["server.port"] = url.port
    with tracer.start_as_current_span(f"trex.pool {provider_name}", context=tracing.extract(headers),
                                      kind=SpanKind.SERVER, attributes=attrs) as span:
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        failure = response.headers.get(hop.H_FAILURE)
        if failure or response.status >= 400:
            error = failure or f"http_{response.status}"
            span.set_attribute("error.type", error)
            span.set_status(Status(StatusCode.ERROR, error))
        usage = response.headers.get(hop.H_USAGE)
        if usage:
            _usage_attributes(span, usage)
        return response


def _usage_attributes(span: Any, header: str) -> None:
    usage = Usage.from_header(header)
    if usage is not None:
        span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
        span.set_attribute("gen_ai.usage.cache_read.input_tokens", usage.cache_read_tokens)
        span.set_attribute("gen_ai.usage.cache_creation.input_tokens", usage.cache_write_total)
