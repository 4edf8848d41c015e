"""OpenAI chat completions ↔ Anthropic Messages (`format: anthropic`): the adapter.

The client speaks OpenAI chat; the upstream speaks `POST {base_url}/messages`. `build` maps the
request and sets Anthropic's headers, `translate_response` maps a whole answer back (both through
`mapping.py`), `stream_translator` hands out an `AnthropicStream` (`stream.py`) that maps the typed
Anthropic SSE events to chat.completion.chunk events as they arrive, and `translate_error` reads
Anthropic's error envelope and maps its types to OpenAI's (the table is in docs/ADAPTERS.md)."""

from __future__ import annotations

from typing import Any

import orjson

from trex_serve.catalog import Provider
from trex_serve.providers.anthropic import passthrough
from trex_serve.providers.anthropic.mapping import ANTHROPIC_VERSION, to_anthropic, to_openai
from trex_serve.providers.anthropic.stream import AnthropicStream
from trex_serve.providers.base import (
    AuthStyle,
    ErrorFields,
    UpstreamCall,
    Usage,
    default_error_type,
    error_fields,
    upstream_call,
)

# Anthropic's error type → (OpenAI's type, the code when Anthropic gives none). The code keeps
# Anthropic's own type visible wherever OpenAI has no closer code of its own.
ERROR_TYPES: dict[str, tuple[str, str]] = {
    "invalid_request_error": ("invalid_request_error", "invalid_request_error"),
    "authentication_error": ("authentication_error", "invalid_api_key"),
    "permission_error": ("permission_error", "permission_error"),
    "not_found_error": ("invalid_request_error", "not_found_error"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit_error": ("rate_limit_error", "rate_limit_error"),
    "api_error": ("server_error", "api_error"),
    "overloaded_error": ("server_error", "overloaded_error"),
}


class AnthropicAdapter:
    format = "anthropic"
    auth = AuthStyle("x-api-key")

    def build(self, api: str, body: dict[str, Any], upstream_model: str, stream: bool,
              api_key: str | None, provider: Provider, *, thinking: str | None = None,
              client_headers: dict[str, str] | None = None, raw: bytes | None = None) -> UpstreamCall:
        if api in ("messages", "count_tokens"):  # the same format at both ends: the body as sent
            path = "/messages" if api == "messages" else "/messages/count_tokens"
            return upstream_call(provider, path, passthrough.request_body(body, upstream_model, raw), api_key,
                                 {"Content-Type": "application/json",
                                  **passthrough.request_headers(client_headers)}, self.auth)
        if api != "chat":
            raise ValueError(f"the anthropic adapter serves the chat and messages APIs, not {api!r}")
        payload = orjson.dumps(to_anthropic(body, upstream_model, stream, thinking))
        return upstream_call(provider, "/messages", payload, api_key,
                             {"Content-Type": "application/json", "anthropic-version": ANTHROPIC_VERSION},
                             self.auth)

    def translate_response(self, api: str, body: bytes) -> tuple[bytes, Usage | None]:
        if api == "messages":
            return passthrough.whole_answer(body)
        if api == "count_tokens":
            return passthrough.token_count(body)
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ValueError("upstream answered with malformed JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("content"), list):
            raise ValueError("upstream answered with something that is not an Anthropic message")
        answer, usage = to_openai(data)
        return orjson.dumps(answer), usage

    def stream_translator(self, api: str, want_usage: bool,
                          model: str) -> AnthropicStream | passthrough.AnthropicPassthroughStream:
        if api == "messages":
            return passthrough.AnthropicPassthroughStream()
        return AnthropicStream(want_usage, model)

    def translate_error(self, status: int, body: bytes) -> ErrorFields:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
        err = data.get("error") if isinstance(data, dict) else None
        kind = err.get("type") if isinstance(err, dict) else None
        if not isinstance(err, dict) or not isinstance(kind, str) or not kind:
            # Garbage, an HTML page, or an OpenAI-style body from a proxy in front of Anthropic.
            return error_fields(status, body)
        message = err.get("message")
        message = message if isinstance(message, str) and message else kind
        mapped, code = ERROR_TYPES.get(kind, (default_error_type(status), kind))
        given_code, param = err.get("code"), err.get("param")
        param = param if isinstance(param, str) and param else None
        if kind == "not_found_error" and message.lower().startswith("model:"):
            # What OpenAI (and the gateway's own 404) answer for a model that does not exist.
            code, param = "model_not_found", param or "model"
        return ErrorFields(message, mapped, given_code if isinstance(given_code, str) and given_code else code, param)
