"""What an answer leaves to keep, read while it passes: the finished Responses object (to store), and
the answer's own bytes (to cache), from a whole body or from an SSE stream relayed chunk by chunk.

A stream is watched, not rebuilt: each chunk is split into whole events (cheap byte splits; only the
final ``response.completed`` event is decoded), and the caller still relays the chunks it read."""

from __future__ import annotations

from typing import Any

import orjson

from trex_serve.providers.sse import EventSplitter, data_of

# The terminal events of a Responses stream: the response is whole in them.
_FINAL = (b"response.completed", b"response.incomplete")
_FAILED = (b"response.failed", b"event: error")
_USAGE_COMMENT = b": trex-usage"


def whole_response(body: bytes) -> dict[str, Any] | None:
    """A whole answer's Responses object, if it is one that finished (completed or incomplete)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(obj, dict) and obj.get("object") == "response" and isinstance(obj.get("id"), str) \
            and obj.get("status") in ("completed", "incomplete"):
        return obj
    return None


def _event_type(event: bytes) -> bytes:
    """An event's ``event:`` name, else the ``"type"`` inside its data, as bytes (not decoded)."""
    if event.startswith(b"event:"):
        return event[6:event.find(b"\n") if b"\n" in event else len(event)].strip()
    marker = event.find(b'"type":')
    if marker < 0:
        return b""
    start = event.find(b'"', marker + 7) + 1
    return event[start:event.find(b'"', start)] if start > 0 else b""


class StreamWatch:
    """One stream's watcher. ``feed`` each chunk before it is relayed; it says whether the stream has
    reached its end (a Responses stream's final event, a chat stream's ``[DONE]``), so the caller can
    keep what it must before the client reads that end. ``kept`` is the stream as a cache replays it
    (the gateway's settlement comments left out), or None once over ``max_bytes`` or not clean."""

    def __init__(self, responses: bool, max_bytes: int) -> None:
        self.responses = responses
        self.max_bytes = max_bytes
        self._split = EventSplitter()
        self._events: list[bytes] | None = []
        self._size = 0
        self.response: dict[str, Any] | None = None  # the finished Responses object
        self.finished = False
        self.failed = False

    def feed(self, chunk: bytes) -> bool:
        """True when this chunk completes the stream's answer."""
        ended = False
        for event in self._split.feed(chunk):
            if self.finished:
                continue  # after the end only the settlement comment comes
            ended = self._event(event) or ended
        return ended

    def _event(self, event: bytes) -> bool:
        if event.startswith(_USAGE_COMMENT):
            return False
        self._keep(event)
        if self.responses:
            kind = _event_type(event)
            if kind in _FINAL:
                data = data_of(event)
                try:
                    obj = orjson.loads(data) if data is not None else None
                except orjson.JSONDecodeError:
                    obj = None
                response = obj.get("response") if isinstance(obj, dict) else None
                if isinstance(response, dict) and isinstance(response.get("id"), str):
                    self.response = response
                self.finished = True
                return True
            if kind in (b"response.failed", b"error"):
                self.failed = True
            return False
        data = data_of(event)
        if data is None:
            return False
        if data.strip() == b"[DONE]":
            self.finished = True
            return True
        if data.startswith(b'{"error"'):
            self.failed = True  # an error the upstream sent mid-stream: never cached
        return False

    def _keep(self, event: bytes) -> None:
        if self._events is None:
            return
        self._size += len(event) + 2
        if self._size > self.max_bytes:
            self._events = None  # too big to cache; still watched for its end
            return
        self._events.append(event)

    @property
    def kept(self) -> bytes | None:
        if self._events is None or not self.finished or self.failed:
            return None
        return b"".join(e + b"\n\n" for e in self._events)
