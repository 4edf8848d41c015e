"""Splitting a byte stream into whole SSE events without decoding more than needed."""

from __future__ import annotations

import orjson

from trex_serve.providers.usage import Usage


class EventSplitter:
    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """Complete events (without their blank-line terminator) found so far."""
        data = self._buf + chunk if self._buf else chunk
        data = data.replace(b"\r\n", b"\n") if b"\r" in data else data
        parts = data.split(b"\n\n")
        self._buf = parts.pop()
        return [p for p in parts if p]

    def rest(self) -> bytes:
        rest, self._buf = self._buf, b""
        return rest


def data_of(event: bytes) -> bytes | None:
    """The joined `data:` payload of one event, or None for comments/other fields."""
    out = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            out.append(line[5:].lstrip(b" "))
    return b"\n".join(out) if out else None


DONE = object()  # a chat stream's `data: [DONE]`


def chat_event(event: bytes) -> object | dict | None:
    """One event of a chat.completion.chunk stream, for a translator of such streams: :data:`DONE`,
    the decoded JSON object (a chunk, or ``{"error": {...}}``), or None for anything to skip.
    Comments are the caller's to pass on (see :func:`usage_comment`)."""
    data = data_of(event)
    if data is None:
        return None
    if data.strip() == b"[DONE]":
        return DONE
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def usage_comment(usage: Usage) -> bytes:
    """An SSE comment the ingress reads for settlement; SSE clients ignore comments."""
    return b": trex-usage " + usage.header().encode() + b"\n\n"


def parse_usage_comment(tail: bytes) -> Usage | None:
    idx = tail.rfind(b": trex-usage ")
    if idx < 0:
        return None
    end = tail.find(b"\n", idx)
    if end < 0:
        return None
    return Usage.from_header(tail[idx + 13:end])
