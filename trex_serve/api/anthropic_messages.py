"""Anthropic's Messages API at the front door (`POST /v1/messages`): what the gateway checks before
admission, its prompt estimate, and its refusals in Anthropic's error shape. The request itself runs
through the one pipeline (`Pipeline.messages`) like every other route."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import Field, field_validator

from trex_serve.admission.tokens import estimate_messages, estimate_text
from trex_serve.api.schemas import TrexExtension, _Open, _strict_bool
from trex_serve.errors import InvalidRequest
from trex_serve.providers.anthropic.from_messages import messages_to_chat

ROLES = ("user", "assistant", "system")  # "system" inside messages: Claude Code sends it at times

# HTTP status → Anthropic's error type (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               424: "invalid_request_error", 429: "rate_limit_error", 500: "api_error", 502: "api_error",
               503: "overloaded_error", 504: "api_error", 529: "overloaded_error"}


class MessagesRequest(_Open):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int = Field(ge=1, le=10_000_000)
    messages: list[Any]
    stream: bool = False
    trex: TrexExtension | None = None

    _strict_stream = field_validator("stream", mode="before")(_strict_bool)


class CountTokensRequest(_Open):
    model: str = Field(min_length=1, max_length=256)
    messages: list[Any]


def _invalid(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{param}: {message}", param=param)


def check_messages_request(payload: dict[str, Any]) -> None:
    """The shape Anthropic checks before a model sees the request: roles, content a string or a list
    of typed blocks. Block types and fields it does not know pass on (Anthropic decides)."""
    for i, msg in enumerate(payload["messages"]):
        param = f"messages.{i}"
        if not isinstance(msg, dict):
            raise _invalid(param, "Input should be an object")
        if msg.get("role") not in ROLES:
            raise _invalid(f"{param}.role", f"Input should be 'user' or 'assistant', got {msg.get('role')!r}")
        content = msg.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise _invalid(f"{param}.content", "Input should be a valid string or list of content blocks")
        for j, block in enumerate(content):
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                raise _invalid(f"{param}.content.{j}.type", "Field required")
    system = payload.get("system")
    if system is not None and not isinstance(system, str | list):
        raise _invalid("system", "Input should be a valid string or list of text blocks")


def estimate_prompt(payload: dict[str, Any]) -> int:
    """Prompt tokens by the gateway's count (admission's reservation): messages, system and tools."""
    chat = messages_to_chat(payload)
    tools = payload.get("tools")
    return estimate_messages(chat["messages"]) + (estimate_text(orjson.dumps(tools)) if tools else 0)


def anthropic_error_body(status: int, openai_body: bytes) -> tuple[int, bytes]:
    """The gateway's OpenAI-shaped refusal in Anthropic's shape; every provider failing is 529
    overloaded_error, as Anthropic answers when it cannot serve."""
    try:
        err = orjson.loads(openai_body).get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):
        err = {}
    if status in (502, 503) and err.get("code") == "upstream_unavailable":
        status = 529
    message = str(err.get("message") or "error")
    param = err.get("param")
    if status == 400 and isinstance(param, str) and not message.startswith(param):
        message = f"{param}: {message}"
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    body = {"type": "error", "error": {"type": kind, "message": message}}
    if err.get("trex"):
        body["trex"] = err["trex"]  # the gateway's request id and attempts, as on the OpenAI routes
    return status, orjson.dumps(body)
