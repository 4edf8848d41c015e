"""The gate a request passes before any upstream is called: authentication and admission
(CONTRACT.md section 3), and settlement afterwards. The pipeline sees only this protocol."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Protocol

from trex_serve.providers.usage import Usage
from trex_serve.routing.resolve import Resolution


@dataclass
class Principal:
    """An authenticated API key with what admission needs to know about it."""

    key_id: str
    account_id: str
    key_prefix: str
    plan: str
    allowed_models: frozenset[str] | None = None
    billing_policy: str = "reject"
    log_content: bool = False
    context: Any = None  # the store's key snapshot


@dataclass
class AdmitAsk:
    resolution: Resolution
    prompt_tokens: int
    max_output_tokens: int | None
    request_id: str
    api: str = "chat"
    replayable: bool = False  # the id came from the trusted front proxy, which may send it again


@dataclass
class Ticket:
    """An admitted request: what was reserved, to be settled exactly once."""

    principal: Principal
    billing: str  # "quota" | "credits" | "none" (a response-cache hit: nothing billed)
    request_id: str
    prompt_estimate: int = 0  # prompt tokens by our count: what a cut answer is billed for its prompt
    reserved_micro: int = 0
    lease_id: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    downgraded: bool = False
    state: dict[str, Any] = field(default_factory=dict)
    replayable: bool = False  # settle leaves a mark so a replay of this request id is never charged again
    replay: bool = False  # this is such a replay: served again, nothing reserved or charged


@dataclass
class Settlement:
    success: bool
    usage: Usage = field(default_factory=Usage)  # tokens by class, as the provider reported them
    provider: str | None = None
    upstream_model: str | None = None
    public_model: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return self.usage.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self.usage.completion_tokens


class Gate(Protocol):
    async def authenticate(self, authorization: str | None, client_ip: str) -> Principal: ...

    def visible_models(self, principal: Principal) -> list[str]: ...

    def check_model(self, principal: Principal, resolution: Resolution) -> None: ...

    async def admit(self, principal: Principal, ask: AdmitAsk) -> Ticket: ...

    async def admit_hit(self, principal: Principal, ask: AdmitAsk) -> Ticket:
        """A request the response cache answers: counted against RPM only, nothing to settle."""
        ...

    async def provider_key(self, principal: Principal, provider: str, override: str | None) -> str | None:
        """The key to call ``provider`` with, or None when it can't be called for this principal."""
        ...

    async def first_delivery(self, request_id: str) -> bool:
        """False when this front-assigned request id arrived before: a replay."""
        ...

    async def settle(self, ticket: Ticket, settlement: Settlement, sent: asyncio.Future | None = None) -> int:
        """Release the lease and bill; returns micro-credits charged. ``sent``, when given, is
        resolved as soon as the settlement has left for the counter store (before its reply): the
        counter store applies it before anything the client sends after reading its answer."""
        ...
