"""Anthropic Messages to an anthropic-format provider: the same format at both ends, so the body goes
as sent (the model name rewritten; `anthropic-version` and `anthropic-beta` passed on) and the answer
and its stream events come back as received. Only usage is read on the way, for billing: whole
answers from `usage`, streams from `message_start` and `message_delta`; a stream cut short is billed
for the text it delivered."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson

from trex_serve.admission.tokens import CHARS_PER_TOKEN
from trex_serve.providers.sse import EventSplitter, data_of, usage_comment
from trex_serve.providers.usage import Usage

DEFAULT_VERSION = "2023-06-01"
# The client's own headers the gateway passes on to an anthropic-format provider, and only these.
CLIENT_HEADERS = ("anthropic-version", "anthropic-beta")


def request_body(body: dict[str, Any], upstream_model: str) -> bytes:
    return orjson.dumps({**body, "model": upstream_model})


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
    """Relays every byte as read; watches the complete events for usage and delivered text."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.delivered_chars = 0
        self._split = EventSplitter()
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
        return chunk

    def finish(self) -> bytes:
        rest = self._split.rest()
        if rest.strip():
            self._watch(rest)
        seen = Usage.from_anthropic(self._seen) or Usage()
        if not self._final:  # cut short: what was delivered, counted
            seen = replace(seen, output_tokens=max(seen.output_tokens, self.delivered_chars // CHARS_PER_TOKEN),
                           estimated=True)
        self.usage = seen
        return usage_comment(seen)
