"""The one hop between an ingress replica and a provider-pool replica: a plain HTTP relay.
Header names and the request/answer shapes both sides agree on."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

H_SECRET = "X-Trex-Pool-Secret"
H_REQUEST_ID = "X-Trex-Request-Id"
H_PROVIDER = "X-Trex-Provider"
H_MODEL = "X-Trex-Upstream-Model"
H_KEY = "X-Trex-Upstream-Key"
H_KEY_ID = "X-Trex-Upstream-Key-Id"  # which of the provider's managed keys the pool sends (an id, not a secret)
H_API = "X-Trex-Api"
H_STREAM = "X-Trex-Stream"
H_WANT_USAGE = "X-Trex-Want-Usage"
H_USAGE = "X-Trex-Usage"
H_FAILURE = "X-Trex-Failure"  # set when the pool could not get a usable answer from the upstream
H_LATENCY = "X-Trex-Upstream-Latency-Ms"
H_THINKING = "X-Trex-Thinking"  # the form of Anthropic thinking the upstream model takes
H_CLIENT_PREFIX = "X-Trex-Client-"  # a client header passed on to a same-format provider

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504, 529})
# Failures of the transport rather than an HTTP answer: always worth another candidate.
RETRYABLE_FAILURES = frozenset({"connect", "reset", "timeout", "first_byte_timeout", "bad_response"})


@dataclass
class HopRequest:
    request_id: str
    provider: str
    upstream_model: str
    api: str  # "chat" | "responses"
    stream: bool
    want_usage: bool
    body: bytes
    api_key: str | None = None
    trace_headers: dict[str, str] | None = None  # W3C traceparent of the attempt's span, when tracing
    key_id: str | None = None  # one of the provider's managed keys, chosen by the ingress
    account_id: str | None = None  # who asks: keeps an account on one managed key
    tokens_estimate: int = 0  # prompt + max output, for a managed key's TPM budget
    thinking: str | None = None  # "budget" | "adaptive": how an anthropic-format model takes reasoning
    client_headers: dict[str, str] | None = None  # anthropic-version / anthropic-beta of a Messages client


@dataclass
class HopResponse:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    chunks: AsyncIterator[bytes] | None = None
    close: Callable[[], Awaitable[None]] | None = None
    failure: str | None = None
    retry_after: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def retryable(self) -> bool:
        if self.failure in RETRYABLE_FAILURES:
            return True
        return self.status in RETRYABLE_STATUS

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.failure is None


@dataclass(frozen=True)
class Outcome:
    """One upstream call as a pool replica reports it to the Router (routing/health.py scores them).
    Defined here, with the hop, so the pool's side needs nothing from routing."""

    provider: str
    model: str
    ok: bool
    latency_ms: float = 0.0
    status: int = 200
    retry_after: float | None = None
    at: float = field(default_factory=time.time)


class ReplicaUnreachable(Exception):
    """The pool replica itself could not be reached: try another replica, not another provider."""


ProviderCaller = Callable[[HopRequest], Awaitable[HopResponse]]
