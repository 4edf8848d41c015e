"""The request's own routing, the body's ``trex.routing``: a pinned provider, the fallbacks to try
after the catalog's candidates, and whether to fall back at all. Defined here, where routing reads
it, so that routing needs nothing from the API layer above it (api/schemas.py embeds it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class FallbackTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: str
    model: str


class TrexRouting(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: str | None = None
    fallbacks: list[FallbackTarget] = Field(default_factory=list, max_length=8)
    allow_fallbacks: bool = True
