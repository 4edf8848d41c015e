"""OpenAI chat completions ↔ Anthropic Messages (`format: anthropic`): the adapter.

The client speaks OpenAI chat; the upstream speaks `POST {base_url}/messages`. `build` maps the
request and sets Anthropic's headers, `translate_response` maps a whole answer back (both through
`mapping.py`), `stream_translator` hands out an `AnthropicStream` (`stream.py`) that maps the typed
Anthropic SSE events to chat.completion.chunk events as they arrive, and `translate_error` reads
Anthropic's error envelope. Importing this package registers the adapter."""

from __future__ import annotations

from typing import Any

import orjson

from trex_serve.catalog import Provider
from trex_serve.providers.anthropic.mapping import ANTHROPIC_VERSION, to_anthropic, to_openai
from trex_serve.providers.anthropic.stream import AnthropicStream
from trex_serve.providers.base import UpstreamCall, Usage, register


class AnthropicAdapter:
    format = "anthropic"

    def build(self, api: str, body: dict[str, Any], upstream_model: str, stream: bool,
              api_key: str | None, provider: Provider) -> UpstreamCall:
        if api != "chat":
            raise ValueError(f"the anthropic adapter serves the chat API only, not {api!r}")
        headers = {"Content-Type": "application/json", "anthropic-version": ANTHROPIC_VERSION,
                   **provider.headers}
        if api_key:
            headers["x-api-key"] = api_key
        payload = orjson.dumps(to_anthropic(body, upstream_model, stream))
        return UpstreamCall(provider.base_url.rstrip("/") + "/messages", headers, payload)

    def translate_response(self, api: str, body: bytes) -> tuple[bytes, Usage | None]:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ValueError("upstream answered with malformed JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("content"), list):
            raise ValueError("upstream answered with something that is not an Anthropic message")
        answer, usage = to_openai(data)
        return orjson.dumps(answer), usage

    def stream_translator(self, api: str, want_usage: bool, model: str) -> AnthropicStream:
        return AnthropicStream(want_usage, model)

    def translate_error(self, status: int, body: bytes) -> tuple[str, str]:
        default = f"upstream_http_{status}"
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            text = body[:200].decode("utf-8", "replace").strip()
            return default, text or default
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            code = str(err.get("type") or err.get("code") or default)
            return code, str(err.get("message") or code)
        if isinstance(err, str):
            return default, err
        return default, default


register(AnthropicAdapter())
