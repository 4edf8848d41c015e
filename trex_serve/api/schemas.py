"""OpenAI wire shapes. Unknown fields are kept so new OpenAI parameters pass through untouched."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from trex_serve.errors import InvalidRequest
from trex_serve.routing.request_routing import TrexRouting
from trex_serve.store.shapes import MAX_CACHE_TTL_S


def _strict_bool(cls: Any, value: Any) -> Any:
    """JSON true/false only (or null): "yes" or 1 is a mistake worth a 400, not a silent stream."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValueError("must be a boolean")
    return value


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TrexCache(BaseModel):
    """The response cache for this request (trex_serve/cache/): answers kept ``ttl_s`` seconds; 0 = off
    for this request even when the key has a default."""

    model_config = ConfigDict(extra="forbid")
    ttl_s: int = Field(ge=0, le=MAX_CACHE_TTL_S)


class TrexExtension(BaseModel):
    model_config = ConfigDict(extra="forbid")
    routing: TrexRouting = Field(default_factory=TrexRouting)
    cache: TrexCache | None = None


class ChatCompletionRequest(_Open):
    model: str = Field(min_length=1, max_length=256)
    # Each message is checked role by role in trex_serve.api.input_checks (plain dicts, no model per message).
    messages: list[Any] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=10_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=10_000_000)
    n: int | None = Field(default=None, ge=1, le=128)
    trex: TrexExtension | None = None

    _strict_stream = field_validator("stream", mode="before")(_strict_bool)


class ResponsesRequest(_Open):
    model: str = Field(min_length=1, max_length=256)
    input: Any
    instructions: str | None = None
    stream: bool = False
    max_output_tokens: int | None = Field(default=None, ge=1, le=10_000_000)
    trex: TrexExtension | None = None

    _strict_stream = field_validator("stream", mode="before")(_strict_bool)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "trex"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def param_path(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """A field path the way OpenAI writes it: ``messages[0].content``, ``trex.routing.fallbacks[1]``."""
    out = ""
    for part in loc:
        if part == "__root__":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _param_of(exc: ValidationError) -> tuple[str | None, str]:
    err = exc.errors()[0]
    return param_path(err.get("loc", ())), err.get("msg", "invalid value")


def parse_model(cls: type[BaseModel], payload: Any) -> Any:
    """Validate a decoded JSON body, turning the first violation into a 400 naming its field."""
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return cls.model_validate(payload)
    except ValidationError as exc:
        param, msg = _param_of(exc)
        raise InvalidRequest(f"Invalid value for '{param}': {msg}", param=param) from None
