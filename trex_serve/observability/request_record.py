"""The one record each request leaves behind: a log row and the source of its metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    request_id: str
    api: str
    account_id: str | None
    key_id: str | None
    key_prefix: str | None
    model_requested: str
    provider: str | None
    model_served: str | None
    attempts: int
    fallbacks: int
    status: int
    error_code: str | None
    latency_ms: float
    ttfb_ms: float | None
    tokens_in: int  # every input token, whatever its class
    tokens_out: int  # every output token, reasoning included
    billing: str | None
    credits_charged: int
    stream: bool
    client_ip: str
    attempt_detail: list[dict[str, Any]] = field(default_factory=list)
    tokens_cache_read: int = 0  # the classes within tokens_in / tokens_out (providers/usage.py)
    tokens_cache_write: int = 0
    tokens_cache_write_1h: int = 0
    tokens_reasoning: int = 0
    cache: str | None = None  # the response cache's verdict: "hit" | "miss" | None (not asked)
    created_at: float = field(default_factory=time.time)

    def row(self) -> dict[str, Any]:
        # A shallow copy: asdict's deep copy costs more than the rest of the record, per request.
        return dict(self.__dict__)
