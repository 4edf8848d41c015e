"""The pipeline's stateful steps, between parsing and admission and after the answer: a
``previous_response_id`` turned into the conversation it continues, the response cache asked (a hit
answers here, counted against RPM only), and what a finished answer leaves behind (a stored
response, a cache entry). A mixin of `Pipeline`, as `Answers` is; `Keeper` is one request's part.

Order, and why: the conversation is read first (an unknown id is refused before anything is
counted or cached), then the cache (a hit needs the key's RPM and nothing else), then the usual
admission for a miss. A finished answer is stored and cached before the client can read its end,
so the next turn (or the same request again) finds it on any replica."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from trex_serve.admission.gate import AdmitAsk, Gate
from trex_serve.admission.tokens import estimate_messages, estimate_text
from trex_serve.api.responses import ResponsesInputError, responses_to_chat
from trex_serve.cache import replay
from trex_serve.cache.keys import entry_digest, ttl_for
from trex_serve.cache.redis_cache import Entry, ResponseCache
from trex_serve.conversations import items
from trex_serve.conversations.capture import StreamWatch, whole_response
from trex_serve.conversations.service import PreviousResponseNotFound, StoredResponses
from trex_serve.errors import InvalidRequest
from trex_serve.observability.request_record import RequestRecord
from trex_serve.pipeline.settle_and_answer import Answer, Call
from trex_serve.providers.usage import Usage
from trex_serve.routing.resolve import Resolution

log = logging.getLogger("trex.stateful")
_NULL_PREVIOUS = b'"previous_response_id":null'


class Keeper:
    """What one request's answer leaves behind: its stored response (``inputs`` set: store it), the
    ``previous_response_id`` it continued (echoed in the answer, kept with it), its cache entry."""

    def __init__(self, stored: StoredResponses | None, cache: ResponseCache | None, api: str, call: Call) -> None:
        self.stored = stored
        self.cache = cache
        self.api = api
        self.call = call
        self.inputs: list[dict[str, Any]] | None = None
        self.previous_id: str | None = None
        self.digest: str | None = None
        self.ttl_s = 0

    @property
    def active(self) -> bool:
        return self.inputs is not None or self.previous_id is not None or self.digest is not None

    def _cacheable(self) -> bool:
        # A downgraded answer came from another model than the one asked for: not this entry's answer.
        ticket = self.call.ticket
        return self.digest is not None and self.cache is not None and not (ticket and ticket.downgraded)

    async def _store(self, response: dict[str, Any] | None) -> None:
        p = self.call.principal
        if self.inputs is None or self.stored is None or response is None or p is None:
            return
        await self.stored.keep(p.account_id, p.key_id, self.call.request_id, self.inputs, response,
                               self.previous_id)

    async def _put(self, kind: str, body: bytes, response: dict[str, Any] | None) -> None:
        p = self.call.principal
        if not self._cacheable() or p is None:
            return
        meta: dict[str, Any] = {"id": response.get("id")} if response is not None else {}
        await self.cache.put(p.account_id, self.digest, Entry(kind, body, meta=meta), self.ttl_s)  # type: ignore[union-attr, arg-type]

    async def whole(self, body: bytes) -> bytes:
        """A whole answer (200): echo, store, cache; the body the client gets."""
        response = whole_response(body) if self.api == "responses" else None
        if response is not None and self.previous_id is not None \
                and response.get("previous_response_id") != self.previous_id:
            response["previous_response_id"] = self.previous_id
            body = orjson.dumps(response)
        await self._store(response)
        await self._put("json", body, response)
        return body

    async def stream(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """A stream (200) relayed as read; stored and cached at its final event, before the client
        reads that event (nothing is buffered: the chunks go on as they come)."""
        limit = self.cache.max_entry_bytes if self._cacheable() else 0  # type: ignore[union-attr]
        watch = StreamWatch(self.api == "responses", limit)
        echo = (b'"previous_response_id":' + orjson.dumps(self.previous_id)) if self.previous_id else None
        async for chunk in chunks:
            if echo is not None and _NULL_PREVIOUS in chunk:
                chunk = chunk.replace(_NULL_PREVIOUS, echo)
            if watch.feed(chunk):
                await self._store(watch.response)
                kept = watch.kept
                if kept is not None:
                    await self._put("sse", kept, watch.response)
            yield chunk


class Stateful:
    """The stateful steps of `Pipeline` (a mixin: it needs the gate, the record sink, the stored
    responses and the cache, each optional: without them a request is served as before)."""

    gate: Gate
    record: Callable[[RequestRecord], None]
    stored: StoredResponses | None
    cache: ResponseCache | None
    _emit: Callable[[Call, int, str | None, Usage | None, int], None]  # Answers._emit: the request's record

    async def _stateful(self, call: Call, api: str, payload: dict[str, Any],
                        resolution: Resolution) -> tuple[dict[str, Any], Answer | None]:
        """After authentication, before admission: the body to serve (a continued conversation
        expanded), and the answer when the cache has it."""
        principal = call.principal
        assert principal is not None
        ttl = ttl_for(payload, getattr(principal.context, "cache_ttl_s", None))
        if api == "chat" and (ttl == 0 or self.cache is None):
            return payload, None  # nothing to continue, keep or cache: most requests, so kept cheap
        keeper = Keeper(self.stored, self.cache, api, call)
        original = payload
        if api == "responses":
            previous = payload.get("previous_response_id")
            if previous is not None:
                if self.stored is None:
                    raise PreviousResponseNotFound(f"Previous response with id '{previous}' not found.",
                                                   param="previous_response_id")
                payload = items.continued(payload, await self.stored.history(principal.account_id, previous))
                keeper.previous_id = previous
            store = original.get("store")
            if store is not None and not isinstance(store, bool):
                raise InvalidRequest("Invalid value for 'store': must be a boolean.", param="store")
            if store is not False and self.stored is not None:  # OpenAI's default: stored
                keeper.inputs = items.stored_input(original.get("input"))
        if ttl > 0 and self.cache is not None:
            keeper.digest, keeper.ttl_s = entry_digest(api, resolution, original), ttl
            entry = await self.cache.get(principal.account_id, keeper.digest)
            if entry is not None:
                return payload, await self._hit(call, api, payload, resolution, entry, keeper)
            call.cache = "miss"
        call.keep = keeper if keeper.active else None
        return payload, None

    async def _hit(self, call: Call, api: str, payload: dict[str, Any], resolution: Resolution, entry: Entry,
                   keeper: Keeper) -> Answer:
        """The cached answer: the key's ceilings and RPM (one Redis call), no provider, nothing billed."""
        max_out = payload.get("max_output_tokens") if api == "responses" else (
            payload.get("max_completion_tokens") or payload.get("max_tokens"))
        ask = AdmitAsk(resolution, _prompt_estimate(api, payload), max_out, call.request_id, api)
        call.ticket = await self.gate.admit_hit(call.principal, ask)  # type: ignore[arg-type]
        call.cache = "hit"
        if api == "responses":
            entry = replay.renamed(entry)  # a new response: stored (and continued) under its own id
            keeper.digest = None
            await keeper._store(replay.response_of(entry))
        call.answered = time.monotonic()
        call.ttfb_ms = (call.answered - call.started) * 1000
        headers = call.headers()
        headers["X-Trex-Cache-Age"] = str(max(0, int(time.time() - entry.created)))
        self._emit(call, 200, None, Usage(), 0)
        if entry.kind == "sse":
            return Answer(200, headers, stream=replay.stream(entry), media_type="text/event-stream")
        return Answer(200, headers, entry.body)


def _prompt_estimate(api: str, payload: dict[str, Any]) -> int:
    """The prompt as admission would count it on a miss (the key's prompt ceiling applies to hits too)."""
    if api == "chat":
        return estimate_messages(payload.get("messages") or [])
    try:
        return estimate_messages(responses_to_chat(payload)["messages"])
    except ResponsesInputError:
        return estimate_text(orjson.dumps(payload))
