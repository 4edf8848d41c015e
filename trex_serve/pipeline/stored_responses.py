"""``GET /v1/responses/{id}``, ``DELETE /v1/responses/{id}`` and ``GET /v1/responses/{id}/input_items``:
one entry point for both HTTP front ends (the FastAPI app and the direct data server), as the
pipeline's entry points are. Any key of the owning account may read and delete; another account's
id answers exactly as an unknown one (404). Nothing here is counted or billed: like ``/v1/models``,
these reads reach no provider."""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from trex_serve.errors import NotFound, TrexError
from trex_serve.pipeline.request_path import Pipeline, new_request_id
from trex_serve.pipeline.settle_and_answer import Answer, Call

PREFIX = "/v1/responses/"
API = "stored_responses"  # the log row's and the metrics' name for these routes


def is_stored_path(path: str) -> bool:
    return path.startswith(PREFIX) and len(path) > len(PREFIX)


async def stored_response(pipeline: Pipeline, method: str, path: str, query: Mapping[str, str],
                          authorization: str | None, client_ip: str) -> Answer:
    call = Call(new_request_id(), API, client_ip)
    try:
        rest = path[len(PREFIX):]
        response_id, _, sub = rest.partition("/")
        call.principal = principal = await pipeline.gate.authenticate(authorization, client_ip)
        stored = pipeline.stored
        if stored is None or not response_id:
            raise NotFound(f"Response with id '{response_id}' not found.", code="response_not_found")
        if sub == "" and method == "GET":
            body = await stored.retrieve(principal.account_id, response_id)
        elif sub == "" and method == "DELETE":
            body = await stored.delete(principal.account_id, response_id)
        elif sub == "input_items" and method == "GET":
            body = await stored.input_items(principal.account_id, response_id, dict(query))
        elif sub in ("", "input_items"):
            raise TrexError(f"{method} is not allowed on {path}.", status=405, code="method_not_allowed",
                            type="invalid_request_error")
        else:
            raise NotFound(f"No route {path}.", code="not_found")
        return Answer(200, call.headers(), orjson.dumps(body))
    except TrexError as exc:
        return pipeline._error(call, exc)
