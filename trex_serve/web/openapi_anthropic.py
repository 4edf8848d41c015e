"""The OpenAPI description of Anthropic's Messages routes (`/v1/messages`, `/v1/messages/count_tokens`),
added to the spec `openapi.py` builds. As there, these models only describe the wire (client
generators, schemathesis); requests are parsed by `api/anthropic_messages.py`. Open objects: Anthropic's
fields the gateway does not know pass through."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema


class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentBlock(_Doc):
    """`text`, `image`, `tool_use`, `tool_result`, `thinking`, `redacted_thinking`, `document`, ...;
    `cache_control` on any block Anthropic allows it on."""

    type: str


class AnthropicMessage(_Doc):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class AnthropicTool(_Doc):
    """A client tool (`name`, `input_schema`) or a server tool (`type`, e.g. web_search_20250305)."""

    name: str


class MessagesBody(_Doc):
    """Anthropic's Messages request (`anthropic-version` and `anthropic-beta` headers passed on), plus
    the gateway's `trex` routing extension."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage]
    system: str | list[ContentBlock] | None = None
    stream: bool = False
    tools: list[AnthropicTool] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    trex: dict[str, Any] | None = None


class CountTokensBody(_Doc):
    model: str = Field(min_length=1, max_length=256)
    messages: list[AnthropicMessage]
    system: str | list[ContentBlock] | None = None
    tools: list[AnthropicTool] | None = None


class AnthropicUsage(_Doc):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None


class AnthropicAnswer(_Doc):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[ContentBlock]
    stop_reason: str | None = None
    usage: AnthropicUsage


class TokenCount(_Doc):
    input_tokens: int


class AnthropicErrorDetail(_Doc):
    type: str = Field(description="invalid_request_error, authentication_error, billing_error, permission_error, "
                                  "not_found_error, request_too_large, rate_limit_error, api_error, overloaded_error")
    message: str


class AnthropicError(_Doc):
    type: Literal["error"]
    error: AnthropicErrorDetail


_MODELS: list[type[BaseModel]] = [MessagesBody, CountTokensBody, AnthropicAnswer, TokenCount, AnthropicError]
# path -> (request body, JSON answer, what a stream is)
_ROUTES = {"/v1/messages": ("MessagesBody", "AnthropicAnswer", True),
           "/v1/messages/count_tokens": ("CountTokensBody", "TokenCount", False)}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}


def describe(spec: dict[str, Any]) -> dict[str, Any]:
    """Add the Messages routes' bodies and answers (errors in Anthropic's shape) to ``spec``."""
    _, defs = models_json_schema([(m, "validation") for m in _MODELS], ref_template="#/components/schemas/{model}")
    spec.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
    for path, (body, answer, streams) in _ROUTES.items():
        op = spec.get("paths", {}).get(path, {}).get("post")
        if op is None:
            continue
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{body}"}}}}
        ok = _json(answer, "The answer" + ("; with `stream: true`, Anthropic's server-sent events" if streams else ""))
        if streams:
            ok["content"]["text/event-stream"] = {"schema": {"type": "string"}}
        errors = _json("AnthropicError", "Refused, or every provider failed (529): Anthropic's error shape")
        op["responses"] = {"200": ok, "4XX": errors, "5XX": errors}
    return spec
