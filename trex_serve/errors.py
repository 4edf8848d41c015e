"""One typed error hierarchy, mapped to the OpenAI error envelope in one place."""

from __future__ import annotations

from typing import Any

import orjson


class TrexError(Exception):
    status: int = 500
    code: str | None = "internal_error"  # None only when passing on an upstream's null code
    type: str = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after: int | None = None,
        status: int | None = None,
        code: str | None = None,
        type: str | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        if type is not None:
            self.type = type
        self.extra = extra or {}
        self.headers = headers or {}

    def envelope(self, request_id: str, attempts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        trex: dict[str, Any] = {"request_id": request_id, "attempts": attempts or []}
        trex.update(self.extra)
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "code": self.code,
                "param": self.param,
                "trex": trex,
            }
        }

    def body(self, request_id: str, attempts: list[dict[str, Any]] | None = None) -> bytes:
        return orjson.dumps(self.envelope(request_id, attempts))

    def response_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, int(self.retry_after)))
        return headers


class InvalidRequest(TrexError):
    status, code, type = 400, "invalid_request_error", "invalid_request_error"


class RequestTooLarge(TrexError):
    status, code, type = 413, "request_too_large", "invalid_request_error"


class RequestLimitExceeded(TrexError):
    status, code, type = 400, "request_limit_exceeded", "invalid_request_error"


class AuthError(TrexError):
    status, code, type = 401, "invalid_api_key", "authentication_error"


class IpNotAllowed(TrexError):
    status, code, type = 403, "ip_not_allowed", "permission_error"


class PaymentRequired(TrexError):
    status, code, type = 402, "insufficient_credits", "insufficient_quota"


class ModelNotFound(TrexError):
    status, code, type = 404, "model_not_found", "invalid_request_error"


class NotFound(TrexError):
    status, code, type = 404, "not_found", "invalid_request_error"


class Conflict(TrexError):
    status, code, type = 409, "conflict", "invalid_request_error"


class BindingMissing(TrexError):
    status, code, type = 424, "provider_binding_missing", "invalid_request_error"


class RateLimited(TrexError):
    status, code, type = 429, "rate_limit_exceeded", "rate_limit_error"


class ServiceUnavailable(TrexError):
    status, code, type = 503, "service_unavailable", "server_error"


class UpstreamUnavailable(TrexError):
    status, code, type = 502, "upstream_unavailable", "server_error"


class UpstreamError(TrexError):
    """A non-retryable upstream answer passed on whole: the provider's status, type, code, param and
    message (the pool has already mapped them to OpenAI's terms and cut the key out of them)."""

    type = "upstream_error"
    code = None
