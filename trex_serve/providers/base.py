"""The adapter interface. An adapter is stateless; per-stream state lives in its StreamTranslator,
so a fallback can translate the same request again. It never mutates the caller's body."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from trex_serve.catalog import Provider
from trex_serve.providers.usage import Usage


@dataclass(frozen=True)
class UpstreamCall:
    url: str
    headers: dict[str, str]
    body: bytes


class StreamTranslator(Protocol):
    usage: Usage | None
    delivered_chars: int

    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class Adapter(Protocol):
    format: str

    def build(self, api: str, body: dict[str, Any], upstream_model: str, stream: bool,
              api_key: str | None, provider: Provider) -> UpstreamCall: ...

    def translate_response(self, api: str, body: bytes) -> tuple[bytes, Usage | None]: ...

    def stream_translator(self, api: str, want_usage: bool, model: str) -> StreamTranslator: ...

    def translate_error(self, status: int, body: bytes) -> tuple[str, str]:
        """(code, message) of an upstream error body."""
        ...


def error_fields(body: bytes, default_code: str) -> tuple[str, str]:
    """Code and message from an OpenAI-style (or similar) error body, tolerating garbage."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body[:200].decode("utf-8", "replace").strip()
        return default_code, text or default_code
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        code = err.get("code") or err.get("type") or default_code
        return str(code), str(err.get("message") or code)
    if isinstance(err, str):
        return default_code, err
    return default_code, default_code


_ADAPTERS: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    _ADAPTERS[adapter.format] = adapter
    return adapter


def adapter_for(fmt: str) -> Adapter:
    if not _ADAPTERS:
        from trex_serve.providers import openai_chat  # noqa: F401  (registers itself)
        try:
            from trex_serve.providers import anthropic  # noqa: F401
        except ImportError:
            pass
    try:
        return _ADAPTERS[fmt]
    except KeyError:
        raise ValueError(f"no adapter for provider format {fmt!r}") from None
