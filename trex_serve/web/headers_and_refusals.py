"""What every HTTP front end of the data plane shares, whatever server it runs on (FastAPI in
http_app.py, the direct data server in data_server.py): the caller's own provider key, the
headers of a relayed stream, and the OpenAI-style envelope for a refusal or an unexpected error."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from trex_serve.api.anthropic_messages import anthropic_error_body
from trex_serve.errors import InvalidRequest, RequestTooLarge, ServiceUnavailable, TrexError
from trex_serve.hop.relay import MAX_UPSTREAM_KEY_CHARS, valid_upstream_key
from trex_serve.pipeline.request_path import new_request_id
from trex_serve.pipeline.settle_and_answer import Answer

log = logging.getLogger("trex.http")


def check_declared_length(declared: str | None, limit: int) -> None:
    """A body announced larger than the limit is refused before a byte of it is read."""
    if declared is None:
        return
    try:
        size = int(declared)
    except ValueError:
        raise InvalidRequest("Invalid Content-Length header.") from None
    if size > limit:
        raise too_large(limit)


def too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"The request body exceeds the limit of {limit} bytes.")


def upstream_key(headers: Mapping[str, str]) -> str | None:
    """The caller's own provider key, checked before admission so a malformed one costs nothing."""
    value = headers.get("x-upstream-api-key")
    if value and not valid_upstream_key(value):
        raise InvalidRequest(f"X-Upstream-Api-Key must be printable ASCII without spaces and at most "
                             f"{MAX_UPSTREAM_KEY_CHARS} characters.", param="X-Upstream-Api-Key")
    return value


def anthropic_auth(headers: Mapping[str, str]) -> str | None:
    """Anthropic's clients send the key in ``x-api-key`` (Claude Code with ANTHROPIC_AUTH_TOKEN, in
    ``Authorization: Bearer``): either is the Trex key."""
    auth = headers.get("authorization")
    if auth:
        return auth
    key = headers.get("x-api-key")
    return f"Bearer {key}" if key else None


def anthropic_client_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers an anthropic-format provider gets from the client (versions, beta features)."""
    return {name: headers[name] for name in ("anthropic-version", "anthropic-beta") if headers.get(name)}


def stream_headers(answer: Answer) -> dict[str, str]:
    headers = dict(answer.headers)
    headers["Cache-Control"] = "no-cache"
    headers["X-Accel-Buffering"] = "no"
    return headers


def as_trex_error(exc: Exception) -> TrexError:
    """Never a bare 500 or a stack trace on the wire; the log has the details."""
    if isinstance(exc, TrexError):
        return exc
    from sqlalchemy.exc import InterfaceError, OperationalError

    if isinstance(exc, OperationalError | InterfaceError):
        return ServiceUnavailable("The store is unavailable; try again shortly.", code="store_unavailable",
                                  retry_after=1)
    log.error("unhandled error", exc_info=exc)
    return TrexError("The gateway hit an internal error.", status=500)


def refusal(exc: TrexError, request_id: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of a request refused before the pipeline ran: no upstream was tried."""
    rid = request_id or new_request_id()
    headers = {"X-Trex-Request-Id": rid, "X-Trex-Attempts": "0", **exc.response_headers()}
    return exc.status, headers, exc.body(rid)


MESSAGES_PATHS = ("/v1/messages", "/v1/messages/count_tokens")


def anthropic_refusal(exc: TrexError, request_id: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """A refusal on Anthropic's routes (a body over the limit, a malformed header) in Anthropic's
    shape, with its ``request-id`` header, as the pipeline answers its own refusals there."""
    status, headers, body = refusal(exc, request_id)
    status, body = anthropic_error_body(status, body)
    headers["request-id"] = headers["X-Trex-Request-Id"]
    return status, headers, body
