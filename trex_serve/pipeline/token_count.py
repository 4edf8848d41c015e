"""`POST /v1/messages/count_tokens`, a step of `Pipeline` (a mixin, like `settle_and_answer.py`):
the count of the model's anthropic-format provider when the first route has one, else the gateway's own estimate
(messages, system, tools; an estimate, not the provider's tokenizer).

It is counted as a request — the key's RPM, concurrency and daily-quota checks (admission, with
nothing to reserve), a request log row (`api: count_tokens`) and the request metrics — and billed
nothing: its lease is released as a request that produced nothing, which gives the quota request and
the token estimate back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from trex_serve.admission.gate import AdmitAsk, Gate
from trex_serve.api.anthropic_messages import (
    CountTokensRequest,
    anthropic_error_body,
    check_messages_request,
    estimate_prompt,
)
from trex_serve.api.schemas import parse_model
from trex_serve.catalog import Catalog
from trex_serve.errors import InvalidRequest, TrexError
from trex_serve.hop import contract as hop
from trex_serve.observability.request_record import RequestRecord
from trex_serve.pipeline.settle_and_answer import Answer, Call
from trex_serve.routing.resolve import Planner, Resolution, Target, resolve
from trex_serve.settings import Settings

# What admission is asked to reserve for a count: no prompt and the least output it takes (0 would
# read as "unset", which reserves the default output).
_NOTHING = (0, 1)


class TokenCount:
    catalog: Catalog
    settings: Settings
    gate: Gate
    caller: hop.ProviderCaller
    planner: Planner
    record: Callable[[RequestRecord], None]

    async def count_tokens(self, raw: bytes, authorization: str | None, client_ip: str,
                           client_headers: dict[str, str] | None = None,
                           request_id: str | None = None) -> Answer:
        from trex_serve.pipeline.request_path import new_request_id

        call = Call(request_id or new_request_id(), "count_tokens", client_ip)
        try:
            try:
                payload = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise InvalidRequest("The request body is not valid JSON.") from None
            request = parse_model(CountTokensRequest, payload)
            check_messages_request(payload)
            call.model_requested = request.model
            principal = call.principal = await self.gate.authenticate(authorization, client_ip)
            resolution = resolve(self.catalog, request.model, None)
            self.gate.check_model(principal, resolution)
            call.ticket = await self.gate.admit(principal, AdmitAsk(resolution, *_NOTHING, call.request_id,
                                                                    "count_tokens"))
            answer = await self._provider_count(call, resolution, raw, client_headers) or Answer(
                200, call.headers(), orjson.dumps({"input_tokens": estimate_prompt(payload)}))
            await self._settle_failure(call)  # nothing produced, nothing billed: the lease goes back
            self._emit(call, 200, None, None, 0)
        except TrexError as exc:
            await self._settle_failure(call)
            answer = self._error(call, exc)
        if answer.status >= 400:
            answer.status, answer.body = anthropic_error_body(answer.status, answer.body)
        answer.headers.setdefault("request-id", call.request_id)
        return answer

    async def _provider_count(self, call: Call, resolution: Resolution, raw: bytes,
                              client_headers: dict[str, str] | None) -> Answer | None:
        """The first route's own count, when its provider speaks Anthropic's API (the body as the
        client sent it, as for /v1/messages); None otherwise or when it cannot answer (the estimate
        is then given)."""
        target = self.planner.order(resolution)[0]
        spec = self.catalog.provider(target.provider)
        if spec is None or spec.format != "anthropic" or call.principal is None:
            return None
        key = await self.gate.provider_key(call.principal, target.provider, None)
        if key is None and not spec.callable_without_binding():
            return None
        req = hop.HopRequest(call.request_id, target.provider, target.upstream_model, "count_tokens", False,
                             False, raw, key, client_headers=client_headers)
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.request_deadline_s):
                resp = await self.caller(req)
        except (TimeoutError, hop.ReplicaUnreachable) as exc:
            failed = isinstance(exc, TimeoutError)
            call.attempts.append(_attempt(target, 504 if failed else 503,
                                          "timeout" if failed else "pool_unreachable", t0))
            return None
        ok = resp.ok and resp.chunks is None
        call.attempts.append(_attempt(target, resp.status, None if ok else resp.failure or f"http_{resp.status}", t0))
        if not ok:
            return None
        call.served = target
        return Answer(200, call.headers(), resp.body)

    if TYPE_CHECKING:  # provided by `Answers` (settle_and_answer.py), the other mixin of `Pipeline`
        async def _settle_failure(self, call: Call) -> None: ...

        def _error(self, call: Call, exc: TrexError) -> Answer: ...

        def _emit(self, call: Call, status: int, error: str | None, usage: Any, charged: int) -> None: ...


def _attempt(target: Target, status: int, error: str | None, t0: float) -> dict[str, Any]:
    return {"provider": target.provider, "model": target.upstream_model, "status": status, "error": error,
            "latency_ms": round((time.monotonic() - t0) * 1000, 2)}
