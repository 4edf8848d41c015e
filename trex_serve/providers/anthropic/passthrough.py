"""Anthropic Messages to an anthropic-format provider: the same format at both ends, so the body goes
as sent (the model name rewritten; `anthropic-version` and `anthropic-beta` passed on) and the answer
and its stream events come back as received. Only usage is read on the way, for billing: whole
answers from `usage`, streams from `message_start` and `message_delta`; a stream cut short is billed
for the text it delivered."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson

from trex_serve.providers.anthropic.messages_stream import error_event
from trex_serve.providers.raw_json import edit_top_level
from trex_serve.providers.sse import EventSplitter, data_of, usage_comment
from trex_serve.providers.usage import CHARS_PER_TOKEN, Usage

DEFAULT_VERSION = "2023-06-01"
# The client's own headers the gateway passes on to an anthropic-format provider, and only these.
CLIENT_HEADERS = ("anthropic-version", "anthropic-beta")


def request_body(body: dict[str, Any], upstream_model: str, raw: bytes | None = None) -> bytes:
    """The client's own bytes with the model rewritten and the gateway's ``trex`` member taken out;
    the parsed body serialised again only if those bytes cannot be edited (never the case for a body
    the gateway admitted, which it parsed as one JSON object)."""
    if raw:
        try:
            return edit_top_level(raw, {"model": upstream_model}, drop=("trex",))
        except ValueError:
            pass
    return orjson.dumps({k: v for k, v in body.items() if k != "trex"} | {"model": upstream_model})


def request_headers(client_headers: dict[str, str] | None) -> dict[str, str]:
    given = {k.lower(): v for k, v in (client_headers or {}).items() if k.lower() in CLIENT_HEADERS}
    return {"anthropic-version": given.get("anthropic-version") or DEFAULT_VERSION,
            **({"anthropic-beta": given["anthropic-beta"]} if given.get("anthropic-beta") else {})}


def whole_answer(body: bytes) -> tuple[bytes, Usage | None]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValueError("upstream answered with malformed JSON") from None
    if not isinstance(data, dict) or data.get("type") != "message":
        raise ValueError("upstream answered with something that is not an Anthropic message")
    return body, Usage.from_anthropic(data.get("usage"))


def token_count(body: bytes) -> tuple[bytes, None]:
    """A count_tokens answer, as received (nothing to bill)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValueError("upstream answered with malformed JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("input_tokens"), int):
        raise ValueError("upstream answered with something that is not a token count")
    return body, None


class AnthropicPassthroughStream:
    """Relays the bytes as read, each whole event as soon as its last byte arrives; watches the
    events for usage and delivered text."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.delivered_chars = 0
        self._split = EventSplitter()
        self._held = b""  # the start of an event not yet whole
        self._seen: dict[str, Any] = {}
        self._final = False

    def _watch(self, event: bytes) -> None:
        data = data_of(event)
        if not data or (b'"usage"' not in data and b"_delta" not in data):
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(obj, dict):
            return
        kind = obj.get("type")
        usage = (obj.get("message") or {}).get("usage") if kind == "message_start" else obj.get("usage")
        if isinstance(usage, dict):
            self._seen.update({k: v for k, v in usage.items() if v is not None})
            self._final = self._final or kind == "message_delta"
        delta = obj.get("delta") if kind == "content_block_delta" else None
        if isinstance(delta, dict):
            for field in ("text", "thinking", "partial_json"):
                if isinstance(delta.get(field), str):
                    self.delivered_chars += len(delta[field])

    def feed(self, chunk: bytes) -> bytes:
        for event in self._split.feed(chunk):
            self._watch(event)
        # Relayed up to the end of the last whole event: a stream cut mid-event never leaves half an
        # event before the error event that follows (the client could not parse either).
        data = self._held + chunk if self._held else chunk
        end = max((i + len(sep) for sep in (b"\n\n", b"\r\n\r\n") if (i := data.rfind(sep)) >= 0), default=0)
        self._held = data[end:]
        return data[:end]

    def error_event(self, message: str, _code: str = "") -> bytes:
        """The pool's own failure after the stream began, as Anthropic would send one (the part of
        an event cut short is dropped)."""
        self._held = b""
        return error_event(message)

    def finish(self) -> bytes:
        rest = self._split.rest()
        if rest.strip():
            self._watch(rest)
        seen = Usage.from_anthropic(self._seen) or Usage()
        if not self._final:  # cut short: what was delivered, counted
            seen = replace(seen, output_tokens=max(seen.output_tokens, self.delivered_chars // CHARS_PER_TOKEN),
                           estimated=True)
        self.usage = seen
        held, self._held = self._held, b""
        return (held + b"\n\n" if held.strip() else b"") + usage_comment(seen)
