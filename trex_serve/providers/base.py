"""The adapter interface. An adapter is stateless; per-stream state lives in its StreamTranslator,
so a fallback can translate the same request again. It never mutates the caller's body."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import orjson

from trex_serve.catalog import Provider
from trex_serve.providers.usage import Usage


@dataclass(frozen=True)
class UpstreamCall:
    url: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class AuthStyle:
    """How a format sends its key when the catalog names no ``auth_header``."""

    header: str
    scheme: str | None = None


def upstream_call(provider: Provider, path: str, body: bytes, api_key: str | None,
                  headers: dict[str, str], default_auth: AuthStyle) -> UpstreamCall:
    """The one place every adapter turns a provider's catalog entry into a URL and headers, so an
    auth style (Azure's ``api-key``, Google's ``x-goog-api-key``, a fixed ``api-version`` query) is
    catalog data for every format alike."""
    out = {**headers, **provider.headers}
    if api_key:
        name = provider.auth_header or default_auth.header
        # Naming a header of its own drops the format's scheme: such headers take the bare key.
        scheme = provider.auth_scheme if provider.auth_scheme or provider.auth_header else default_auth.scheme
        # A static header of the same name in any case would be sent twice: the key replaces it.
        for existing in [k for k in out if k.lower() == name.lower()]:
            del out[existing]
        out[name] = f"{scheme} {api_key}" if scheme else api_key
    return UpstreamCall(_url(provider, path), out, body)


def _url(provider: Provider, path: str) -> str:
    if not provider.query and "?" not in provider.base_url:
        return provider.base_url.rstrip("/") + path
    # base_url may carry a query of its own (Azure's api-version): the path goes before it, and a
    # parameter named in both is the catalog's ``query`` one.
    parts = urlsplit(provider.base_url)
    url_path = parts.path.rstrip("/") + path
    pairs = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in provider.query]
    pairs.extend(provider.query.items())
    return urlunsplit(parts._replace(path=url_path, query=urlencode(pairs, quote_via=quote)))


class StreamTranslator(Protocol):
    usage: Usage | None
    delivered_chars: int

    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class Adapter(Protocol):
    format: str

    def build(self, api: str, body: dict[str, Any], upstream_model: str, stream: bool,
              api_key: str | None, provider: Provider, *, thinking: str | None = None,
              client_headers: dict[str, str] | None = None, raw: bytes | None = None) -> UpstreamCall:
        """``thinking``: how the upstream model takes reasoning, where the format has several
        forms (the catalog candidate's ``thinking``). ``client_headers``: the client's own headers
        a same-format provider gets (anthropic-version, anthropic-beta). ``raw``: ``body`` as the
        bytes the client sent, for a same-format pass-through that sends them as they are."""
        ...

    def translate_response(self, api: str, body: bytes) -> tuple[bytes, Usage | None]: ...

    def stream_translator(self, api: str, want_usage: bool, model: str) -> StreamTranslator: ...

    def translate_error(self, status: int, body: bytes) -> ErrorFields:
        """An upstream error body (any bytes at all) in OpenAI's error terms."""
        ...


@dataclass(frozen=True)
class ErrorFields:
    """An upstream's error as the client gets it in OpenAI's envelope. ``code`` may be None: OpenAI
    itself sends ``"code": null`` for many errors, and the client gets what the provider sent."""

    message: str
    type: str
    code: str | None = None
    param: str | None = None


def default_error_type(status: int) -> str:
    """OpenAI's error type for an HTTP status, for an upstream body that names none."""
    if status >= 500:
        return "server_error"
    return {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error")


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def error_fields(status: int, body: bytes) -> ErrorFields:
    """An OpenAI-style (or similar) error body kept whole, tolerating garbage: without a type or a
    code the code is ``upstream_http_<status>``, so the client and the request log can still tell."""
    fallback = f"upstream_http_{status}"
    kind = default_error_type(status)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body[:200].decode("utf-8", "replace").strip()
        return ErrorFields(text or fallback, kind, fallback)
    if isinstance(data, list) and len(data) == 1:
        data = data[0]  # Gemini's OpenAI-compatible endpoint wraps its envelope in a list
    err = data.get("error") if isinstance(data, dict) else None
    if err is None and isinstance(data, dict) and _text(data.get("message")):
        err = data  # an unwrapped envelope ({"object": "error", "message": ...}, older vLLM)
    if isinstance(err, str):
        return ErrorFields(err or fallback, kind, fallback)
    if not isinstance(err, dict):
        return ErrorFields(fallback, kind, fallback)
    given_type = _text(err.get("type"))
    # Google's envelope has a numeric code and names the condition in ``status``.
    code = _text(err.get("code")) or _text(err.get("status"))
    if code is None and given_type is None:
        code = fallback
    message = err.get("message")
    message = message if isinstance(message, str) and message else code or given_type or fallback
    return ErrorFields(message, given_type or kind, code, _text(err.get("param")))
