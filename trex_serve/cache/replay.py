"""A cache entry turned back into an answer. A chat answer is replayed byte for byte; a Responses
answer is a new response: the cached one under a fresh id (so that storing it, and continuing from
it with ``previous_response_id``, work as for any other response)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from trex_serve.api.responses import new_id
from trex_serve.cache.redis_cache import Entry
from trex_serve.conversations.capture import StreamWatch, whole_response


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body  # one write: the whole stream was already there


def renamed(entry: Entry) -> Entry:
    """A Responses entry under a new response id (the id appears in the body only as itself)."""
    old = entry.meta.get("id")
    if not isinstance(old, str) or not old:
        return entry
    return Entry(entry.kind, entry.body.replace(old.encode(), new_id("resp").encode()), entry.created, entry.meta)


def response_of(entry: Entry) -> dict[str, Any] | None:
    """The finished Responses object inside an entry (for storing a hit)."""
    if entry.kind == "json":
        return whole_response(entry.body)
    watch = StreamWatch(True, len(entry.body) + 1)
    watch.feed(entry.body)
    return watch.response


def stream(entry: Entry) -> AsyncIterator[bytes]:
    return _once(entry.body)
