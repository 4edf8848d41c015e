"""The OpenAPI description of the generation endpoints' bodies.

The handlers read raw bytes (parsing is orjson + `schemas.parse_model` + `messages` checks on the
hot path), so FastAPI cannot see their bodies. These pydantic models exist only to describe the
wire for `/openapi.json` (client generators, schemathesis); no request is ever parsed with them.
They stay open (`additionalProperties`): fields the gateway does not know pass through."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from trex_serve.api.schemas import ChatCompletionRequest, ModelCard, ModelList, ResponsesRequest
from trex_serve.web import openapi_anthropic


class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(_Doc):
    """A typed part: `text` (with `text`), `image_url`, `input_audio`, `file`; other types pass."""

    type: str


Content = str | list[ContentPart]


class FunctionCall(_Doc):
    name: str
    arguments: str


class ToolCall(_Doc):
    id: str
    type: str = "function"
    function: FunctionCall | None = None


class SystemMessage(_Doc):
    role: Literal["system"]
    content: Content


class DeveloperMessage(_Doc):
    role: Literal["developer"]
    content: Content


class UserMessage(_Doc):
    role: Literal["user"]
    content: Content


class AssistantMessage(_Doc):
    """Needs `content`, or `tool_calls` (then `content` may be null), or a legacy `function_call`."""

    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None


class ToolMessage(_Doc):
    role: Literal["tool"]
    tool_call_id: str
    content: Content


class FunctionMessage(_Doc):
    """Legacy function result."""

    role: Literal["function"]
    name: str
    content: str | None = None


ChatMessage = Annotated[SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage
                        | FunctionMessage, Field(discriminator="role")]


class ChatCompletionBody(ChatCompletionRequest):
    """OpenAI chat completions request, plus the `trex` routing extension."""

    messages: list[ChatMessage] = Field(min_length=1)  # type: ignore[assignment]


class InputMessage(_Doc):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content


class FunctionCallItem(_Doc):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Doc):
    type: Literal["function_call_output"]
    call_id: str
    output: Content


class ItemReference(_Doc):
    type: Literal["item_reference"]
    id: str


class OtherItem(_Doc):
    """Any other item type OpenAI defines (reasoning, tool calls of built-in tools, ...)."""

    type: str


InputItem = InputMessage | FunctionCallItem | FunctionCallOutputItem | ItemReference | OtherItem


class ResponsesBody(ResponsesRequest):
    """OpenAI Responses request, plus the `trex` routing extension."""

    input: str | list[InputItem]


class Usage(_Doc):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Choice(_Doc):
    index: int
    message: AssistantMessage
    finish_reason: str | None = None


class ChatCompletion(_Doc):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class ResponseObject(_Doc):
    id: str
    object: Literal["response"]
    created_at: float
    status: str
    model: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None = None


class ErrorDetail(_Doc):
    message: str
    type: str
    code: str | None = None
    param: str | None = None
    trex: dict[str, Any] = Field(description="request_id, and the upstream attempts made")


class ErrorEnvelope(_Doc):
    error: ErrorDetail


_MODELS: list[type[BaseModel]] = [ChatCompletionBody, ResponsesBody, ChatCompletion, ResponseObject,
                                  ErrorEnvelope, ModelList, ModelCard]
# path -> (request body, JSON answer)
_GENERATION = {"/v1/chat/completions": ("ChatCompletionBody", "ChatCompletion"),
               "/v1/responses": ("ResponsesBody", "ResponseObject")}
_READS = {"/v1/models": "ModelList", "/v1/models/{model_id}": "ModelCard"}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _errors() -> dict[str, Any]:
    return {"4XX": _json("ErrorEnvelope", "Refused: the OpenAI error envelope"),
            "5XX": _json("ErrorEnvelope", "Upstream unavailable: the OpenAI error envelope with the attempts")}


def describe(spec: dict[str, Any]) -> dict[str, Any]:
    """Add the bodies and answers of the data-plane endpoints to FastAPI's generated spec."""
    _, defs = models_json_schema([(m, "validation") for m in _MODELS],
                                 ref_template="#/components/schemas/{model}")
    spec.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
    paths = spec.get("paths", {})
    for path, (body, answer) in _GENERATION.items():
        op = paths.get(path, {}).get("post")
        if op is None:
            continue
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
        ok = _json(answer, "The answer; with `stream: true`, server-sent events")
        ok["content"]["text/event-stream"] = {"schema": {"type": "string"}}
        op["responses"] = {"200": ok, **_errors()}
    for path, answer in _READS.items():
        op = paths.get(path, {}).get("get")
        if op is not None:
            op["responses"] = {"200": _json(answer, "What this key may use"), **_errors()}
    return openapi_anthropic.describe(spec)


def install(app: FastAPI) -> None:
    """Serve the described spec at /openapi.json (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = describe(get_openapi(title=app.title, version=app.version,
                                                      routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
