"""Stored responses as the pipeline and the HTTP routes use them: the conversation a
``previous_response_id`` continues, keeping a finished response, and retrieve / delete / input items,
every one scoped to the caller's account (another account's id answers exactly as a missing one).

Everything here runs the SQL store in a thread; a store that cannot be read answers 503
``store_unavailable``, one that cannot be written loses the stored copy (logged and counted), never
the answer the client already paid for."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from trex_serve.conversations import items
from trex_serve.conversations.store import MAX_CHAIN, ResponseStore, Turn
from trex_serve.errors import InvalidRequest, NotFound, ServiceUnavailable
from trex_serve.store.crypto import DecryptionError

log = logging.getLogger("trex.conversations")


class PreviousResponseNotFound(InvalidRequest):
    """OpenAI's own answer for a ``previous_response_id`` it does not have: 400, this code, the param."""

    code = "previous_response_not_found"


def _now() -> datetime:
    return datetime.now(UTC)


def _unavailable() -> ServiceUnavailable:
    return ServiceUnavailable("The response store is unavailable; try again shortly.", code="store_unavailable",
                              retry_after=1)


class StoredResponses:
    def __init__(self, store: ResponseStore, retention_days: int = 30,
                 on_failure: Callable[[], None] | None = None) -> None:
        self.store = store
        self.retention = timedelta(days=max(1, retention_days))
        self.on_failure = on_failure or (lambda: None)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except (SQLAlchemyError, DecryptionError) as exc:
            log.warning("response store: %s failed: %s: %s", getattr(fn, "__name__", fn), type(exc).__name__, exc)
            raise _unavailable() from None

    # ---- the request path -------------------------------------------------------------------------

    async def history(self, account_id: str, previous_id: Any) -> list[dict[str, Any]]:
        """The items a ``previous_response_id`` stands for: every earlier turn's input and output."""
        if not isinstance(previous_id, str) or not previous_id:
            raise InvalidRequest("previous_response_id must be a response id (a non-empty string).",
                                 param="previous_response_id")
        chain = await self._run(self.store.chain, account_id, previous_id, _now())
        if chain is None:
            raise PreviousResponseNotFound(f"Previous response with id '{previous_id}' not found.",
                                           param="previous_response_id")
        if chain.missing is not None:
            raise PreviousResponseNotFound(
                f"Previous response with id '{previous_id}' cannot be continued: the earlier response "
                f"'{chain.missing}' in its conversation was deleted or has expired.", param="previous_response_id")
        if chain.too_long:
            raise InvalidRequest(f"The conversation of '{previous_id}' is longer than {MAX_CHAIN} turns; "
                                 "start a new one with the context in input.", param="previous_response_id")
        return items.history([(t.input, t.output) for t in chain.turns])

    async def keep(self, account_id: str, key_id: str | None, request_id: str, inputs: list[dict[str, Any]],
                   response: dict[str, Any], previous_id: str | None) -> bool:
        """Store a finished response with this turn's input items; False (logged, counted) if the
        database refused. The stored copy names the response it continued."""
        if previous_id is not None:
            response = {**response, "previous_response_id": previous_id}
        if response.get("id") == previous_id:
            return False  # an upstream that answered with the id it continued: no loop in a conversation
        created = _now()
        turn = Turn(str(response["id"]), previous_id, inputs, response, str(response.get("model") or "") or None,
                    created, key_id, request_id)
        try:
            return await asyncio.to_thread(self.store.save, account_id, turn, created, created + self.retention)
        except Exception as exc:  # noqa: BLE001 - the answer stands; only its stored copy is lost
            log.error("response %s of request %s could not be stored: %s: %s", turn.id, request_id,
                      type(exc).__name__, exc)
            self.on_failure()
            return False

    # ---- GET / DELETE /v1/responses/{id} ----------------------------------------------------------

    async def _turn(self, account_id: str, response_id: str) -> Turn:
        turn = await self._run(self.store.get, account_id, response_id, _now())
        if turn is None:
            raise NotFound(f"Response with id '{response_id}' not found.", code="response_not_found")
        return turn

    async def retrieve(self, account_id: str, response_id: str) -> dict[str, Any]:
        return (await self._turn(account_id, response_id)).response

    async def delete(self, account_id: str, response_id: str) -> dict[str, Any]:
        if not await self._run(self.store.delete, account_id, response_id, _now()):
            raise NotFound(f"Response with id '{response_id}' not found.", code="response_not_found")
        return {"id": response_id, "object": "response", "deleted": True}

    async def input_items(self, account_id: str, response_id: str, query: dict[str, str]) -> dict[str, Any]:
        """The items the response was generated from: its conversation's earlier input and output,
        then its own input; paginated as OpenAI's list endpoints are."""
        limit, order, after, before = items.list_params(query)
        chain = await self._run(self.store.chain, account_id, response_id, _now())
        if chain is None:
            raise NotFound(f"Response with id '{response_id}' not found.", code="response_not_found")
        turns = chain.turns
        if not turns:  # an ancestor is gone: what is left is this response's own input
            turns = [await self._turn(account_id, response_id)]
        context: list[dict[str, Any]] = []
        for earlier in turns[:-1]:
            context.extend(earlier.input)
            context.extend(o for o in earlier.output if isinstance(o, dict) and o.get("id"))
        context.extend(turns[-1].input)
        return items.page(context, limit=limit, order=order, after=after, before=before)

    # ---- retention ----------------------------------------------------------------------------------

    async def purge(self) -> int:
        return await asyncio.to_thread(self.store.purge, _now())

    async def purge_loop(self, every_s: float = 3600.0) -> None:
        """Expired responses are already invisible (every read checks the expiry); this deletes them."""
        while True:
            try:
                removed = await self.purge()
                if removed:
                    log.info("response retention: deleted %d expired stored responses", removed)
            except Exception:  # noqa: BLE001 - retried at the next pass
                log.warning("response retention pass failed; will retry", exc_info=True)
            await asyncio.sleep(every_s)
