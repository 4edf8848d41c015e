"""Provider errors kept whole: each adapter's translate_error on the providers' real error bodies
(and on garbage), in OpenAI's terms — status, type, code, param and message as the client gets them."""

from __future__ import annotations

import pytest

from trex_serve.providers.base import ErrorFields
from trex_serve.providers.registry import adapter_for

TEMPERATURE = (b'{"error": {"message": "Invalid value for \'temperature\': expected a number between 0 and 2.", '
               b'"type": "invalid_request_error", "param": "temperature", "code": "invalid_value"}}')
UNRECOGNIZED = (b'{"error": {"message": "Unrecognized request argument supplied: foo", '
                b'"type": "invalid_request_error", "param": null, "code": null}}')
GEMINI = (b'[{"error": {"code": 400, "message": "Invalid JSON payload received. Unknown name \\"reasoning\\": '
          b'Cannot find field.", "status": "INVALID_ARGUMENT"}}]')


@pytest.mark.parametrize("status,body,expected", [
    (400, TEMPERATURE, ErrorFields("Invalid value for 'temperature': expected a number between 0 and 2.",
                                   "invalid_request_error", "invalid_value", "temperature")),
    # OpenAI's own null code is passed on as null, not invented.
    (400, UNRECOGNIZED, ErrorFields("Unrecognized request argument supplied: foo", "invalid_request_error")),
    (401, b'{"error": {"message": "Incorrect API key provided: sk-...abcd.", "type": "invalid_request_error", '
          b'"param": null, "code": "invalid_api_key"}}',
     ErrorFields("Incorrect API key provided: sk-...abcd.", "invalid_request_error", "invalid_api_key")),
    # Google names the condition in status and wraps the envelope in a list.
    (400, GEMINI, ErrorFields('Invalid JSON payload received. Unknown name "reasoning": Cannot find field.',
                              "invalid_request_error", "INVALID_ARGUMENT")),
    (400, b'{"object": "error", "message": "max_tokens is too large", "type": "BadRequestError", '
          b'"param": null, "code": 400}',
     ErrorFields("max_tokens is too large", "BadRequestError")),
    (403, b"<html><body>403 Forbidden</body></html>",
     ErrorFields("<html><body>403 Forbidden</body></html>", "permission_error", "upstream_http_403")),
    (404, b"", ErrorFields("upstream_http_404", "invalid_request_error", "upstream_http_404")),
    (422, b'{"error": "Input validation error: inputs tokens + max_new_tokens must be <= 4096"}',
     ErrorFields("Input validation error: inputs tokens + max_new_tokens must be <= 4096",
                 "invalid_request_error", "upstream_http_422")),
    (400, b'{"detail": [1, 2]}', ErrorFields("upstream_http_400", "invalid_request_error", "upstream_http_400")),
    (400, b"[1, 2]", ErrorFields("upstream_http_400", "invalid_request_error", "upstream_http_400")),
    (400, b'{"error": {"message": {"nested": true}, "code": "weird"}}',
     ErrorFields("weird", "invalid_request_error", "weird")),
    (500, b"\xff\xfe not utf-8", ErrorFields("\ufffd\ufffd not utf-8", "server_error", "upstream_http_500")),
])
def test_openai_translate_error_keeps_the_providers_fields(status, body, expected):
    assert adapter_for("openai").translate_error(status, body) == expected


def anthropic(kind: str, message: str) -> bytes:
    return b'{"type":"error","error":{"type":"%s","message":"%s"},"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"}' % (
        kind.encode(), message.encode())


@pytest.mark.parametrize("status,body,expected", [
    (400, anthropic("invalid_request_error", "messages.1.content: Input should be a valid list"),
     ErrorFields("messages.1.content: Input should be a valid list", "invalid_request_error",
                 "invalid_request_error")),
    (404, anthropic("not_found_error", "model: claude-x"),
     ErrorFields("model: claude-x", "invalid_request_error", "model_not_found", "model")),
    (404, anthropic("not_found_error", "Not found"),
     ErrorFields("Not found", "invalid_request_error", "not_found_error")),
    (401, anthropic("authentication_error", "invalid x-api-key"),
     ErrorFields("invalid x-api-key", "authentication_error", "invalid_api_key")),
    (403, anthropic("permission_error", "Your API key does not have permission to use the specified resource."),
     ErrorFields("Your API key does not have permission to use the specified resource.", "permission_error",
                 "permission_error")),
    (413, anthropic("request_too_large", "Request exceeds the maximum allowed number of bytes."),
     ErrorFields("Request exceeds the maximum allowed number of bytes.", "invalid_request_error",
                 "request_too_large")),
    (429, anthropic("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit"),
     ErrorFields("Number of request tokens has exceeded your per-minute rate limit", "rate_limit_error",
                 "rate_limit_error")),
    (500, anthropic("api_error", "Internal server error"),
     ErrorFields("Internal server error", "server_error", "api_error")),
    (529, anthropic("overloaded_error", "Overloaded"), ErrorFields("Overloaded", "server_error", "overloaded_error")),
    # A type this table does not know: OpenAI's type for the status, Anthropic's type as the code.
    (402, anthropic("billing_error", "Your credit balance is too low"),
     ErrorFields("Your credit balance is too low", "invalid_request_error", "billing_error")),
    (400, b'{"type":"error","error":{"type":"invalid_request_error"}}',
     ErrorFields("invalid_request_error", "invalid_request_error", "invalid_request_error")),
    # A proxy in front of Anthropic answering in OpenAI's shape: its code and param are kept.
    (400, b'{"error": {"message": "bad temperature", "type": "invalid_request_error", "param": "temperature", '
          b'"code": "invalid_value"}}',
     ErrorFields("bad temperature", "invalid_request_error", "invalid_value", "temperature")),
    (502, b"<html><head><title>502 Bad Gateway</title></head></html>",
     ErrorFields("<html><head><title>502 Bad Gateway</title></head></html>", "server_error", "upstream_http_502")),
    (400, b'{"type": "error", "error": null}',
     ErrorFields("upstream_http_400", "invalid_request_error", "upstream_http_400")),
    (401, b"not json {", ErrorFields("not json {", "authentication_error", "upstream_http_401")),
])
def test_anthropic_translate_error_maps_types_to_openai(status, body, expected):
    assert adapter_for("anthropic").translate_error(status, body) == expected
