"""The request path, top to bottom: parse → authenticate → resolve → admit → bind → attempts with
fallback → relay the answer → settle → record. Collaborators arrive as arguments; no Ray here.
The steps after the attempts (the answer, settlement and the request record) are the `Answers`
mixin of `settle_and_answer.py`, with the `Call` state and the `Answer` this returns."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson

from trex_serve.admission.gate import AdmitAsk, Gate, Principal, Ticket
from trex_serve.admission.tokens import estimate_messages, estimate_text
from trex_serve.api.anthropic_messages import (
    MessagesRequest,
    anthropic_error_body,
    check_messages_request,
    estimate_prompt,
)
from trex_serve.api.input_checks import check_chat_request, check_responses_request
from trex_serve.api.responses import ResponsesInputError, responses_to_chat
from trex_serve.api.schemas import ChatCompletionRequest, ModelCard, ModelList, ResponsesRequest, parse_model
from trex_serve.cache.redis_cache import ResponseCache
from trex_serve.catalog import Catalog
from trex_serve.conversations.service import StoredResponses
from trex_serve.errors import (
    BindingMissing,
    InvalidRequest,
    PaymentRequired,
    TrexError,
)
from trex_serve.hop import contract as hop
from trex_serve.observability import tracing
from trex_serve.observability.request_record import RequestRecord
from trex_serve.pipeline.settle_and_answer import Answer, Answers, Call
from trex_serve.pipeline.stateful import Stateful
from trex_serve.pipeline.token_count import TokenCount
from trex_serve.routing.managed_key_caller import KEYS_EXHAUSTED
from trex_serve.routing.resolve import SMART_AUTO, Planner, Resolution, Target, resolve
from trex_serve.settings import Settings

Route = tuple[Target, str | None]  # a target and the provider key to call it with
# What a generation route does once the shared prologue has the request parsed, authenticated,
# resolved and not answered from the cache: (call, payload, parsed request, principal, resolution).
Serve = Callable[[Call, dict[str, Any], Any, Principal, Resolution], Awaitable[Answer]]
log = logging.getLogger("trex.pipeline")


def _dumps(payload: Any) -> bytes:
    try:
        return orjson.dumps(payload)
    except TypeError:  # orjson reads 1,024 levels of nesting but writes only 255
        raise InvalidRequest("The request body is nested too deeply.") from None


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


class Pipeline(Answers, Stateful, TokenCount):
    def __init__(self, catalog: Catalog, settings: Settings, gate: Gate, caller: hop.ProviderCaller,
                 planner: Planner, record: Callable[[RequestRecord], None] | None = None, *,
                 stored: StoredResponses | None = None, cache: ResponseCache | None = None) -> None:
        """``stored``: stored responses (``store``, ``previous_response_id``); ``cache``: the response
        cache. Without them Responses are not kept and the cache is never asked."""
        self.catalog = catalog
        self.settings = settings
        self.gate = gate
        self.caller = caller
        self.planner = planner
        self.record = record or (lambda _r: None)
        self.stored = stored
        self.cache = cache

    # ---- entry points -------------------------------------------------------------------------

    async def models(self, authorization: str | None, client_ip: str, model_id: str | None = None,
                     trace_carrier: Mapping[str, str] | None = None) -> Answer:
        call = Call(new_request_id(), "models", client_ip)
        route = "/v1/models" if model_id is None else "/v1/models/{model}"
        with tracing.listing(call, route, trace_carrier) as span:
            answer = await self._models(call, authorization, client_ip, model_id)
            tracing.answered(span, answer.status)
        return answer

    async def _models(self, call: Call, authorization: str | None, client_ip: str, model_id: str | None) -> Answer:
        try:
            principal = await self.gate.authenticate(authorization, client_ip)
            ids = self.gate.visible_models(principal)
            if model_id is not None:
                if model_id not in ids:
                    from trex_serve.errors import ModelNotFound
                    raise ModelNotFound(f"The model '{model_id}' does not exist or you do not have access to it.",
                                        param="model")
                return Answer(200, call.headers(), ModelCard(id=model_id).model_dump_json().encode())
            body = ModelList(data=[ModelCard(id=i) for i in ids]).model_dump_json().encode()
            return Answer(200, call.headers(), body)
        except TrexError as exc:
            return self._error(call, exc)

    async def chat(self, raw: bytes, authorization: str | None, client_ip: str,
                   upstream_key: str | None = None, request_id: str | None = None,
                   trace_carrier: Mapping[str, str] | None = None) -> Answer:
        """``request_id``: assigned by the trusted front proxy (front_id.py), which may send the same
        request again after losing the replica that had it; admission and settlement are idempotent by it."""

        async def serve(call: Call, payload: dict[str, Any], request: ChatCompletionRequest,
                        principal: Principal, resolution: Resolution) -> Answer:
            prompt_tokens = estimate_messages(payload["messages"])
            max_out = request.max_completion_tokens or request.max_tokens
            ask = AdmitAsk(resolution, prompt_tokens, max_out, call.request_id, "chat", request_id is not None)
            call.tokens_estimate = prompt_tokens + (max_out or 0)
            routes = await self._admitted(call, principal, ask, upstream_key)
            payload.pop("trex", None)
            if call.ticket.downgraded:
                payload["model"] = SMART_AUTO
            want_usage = bool((request.stream_options or {}).get("include_usage"))
            body = _dumps(payload)
            return await self._attempts(call, routes, lambda _t: ("chat", body), want_usage)

        call = Call(request_id or new_request_id(), "chat", client_ip)
        return await self._generation(call, raw, ChatCompletionRequest, check_chat_request, authorization,
                                      trace_carrier, serve)

    async def _generation(self, call: Call, raw: bytes, schema: type, check: Callable[[dict[str, Any]], None],
                          authorization: str | None, trace_carrier: Mapping[str, str] | None,
                          serve: Serve) -> Answer:
        """What chat and responses share: the front step, then the stateful one (a cache hit answers
        here), then ``serve`` (admission, the attempts); any refusal or bug on the way gives back
        what was admitted and answers the error envelope."""
        tracing.begin(call, trace_carrier)
        try:
            payload, request, principal, resolution = await self._front(call, raw, schema, authorization, check)
            # A Responses previous_response_id becomes the conversation it continues; the cache may
            # answer here.
            payload, cached = await self._stateful(call, call.api, payload, resolution)
            if cached is not None:
                return cached
            return await serve(call, payload, request, principal, resolution)
        except TrexError as exc:
            await self._settle_failure(call)
            return self._error(call, exc)
        except Exception:
            return await self._internal_error(call)

    async def _front(self, call: Call, raw: bytes, schema: type, authorization: str | None,
                     check: Callable[[dict[str, Any]], None],
                     ) -> tuple[dict[str, Any], Any, Principal, Resolution]:
        """What every generation request does first: parse, validate (the top-level fields, then
        each message or input item), authenticate, resolve the model."""
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InvalidRequest("The request body is not valid JSON.") from None
        request = parse_model(schema, payload)
        check(payload)
        call.model_requested, call.stream = request.model, request.stream
        principal = call.principal = await self.gate.authenticate(authorization, call.client_ip)
        resolution = resolve(self.catalog, request.model, request.trex.routing if request.trex else None)
        self.gate.check_model(principal, resolution)
        return payload, request, principal, resolution

    async def _internal_error(self, call: Call) -> Answer:
        """A bug or an unexpected failure still releases what was admitted and answers the envelope."""
        log.exception("request %s failed unexpectedly", call.request_id)
        await self._settle_failure(call)
        return self._error(call, TrexError("The gateway hit an internal error.", status=500))

    async def responses(self, raw: bytes, authorization: str | None, client_ip: str,
                        upstream_key: str | None = None, request_id: str | None = None,
                        trace_carrier: Mapping[str, str] | None = None) -> Answer:
        """OpenAI Responses API: passed through to providers that speak it, translated to chat
        completions (and the answer back) for the others. ``request_id`` as for :meth:`chat`."""

        async def serve(call: Call, payload: dict[str, Any], request: ResponsesRequest,
                        principal: Principal, resolution: Resolution) -> Answer:
            untranslatable: InvalidRequest | None = None
            try:
                chat_payload = responses_to_chat(payload)
            except ResponsesInputError as exc:
                # Chat has no form of it (a hosted tool such as code_interpreter): only providers that
                # serve the Responses API natively take it, as sent; the chat body is then never sent.
                untranslatable, chat_payload = InvalidRequest(str(exc), param=exc.param), {"messages": []}
                if not any(self._native(t) for t in resolution.targets):
                    raise untranslatable from None
            prompt_tokens = estimate_text(raw) if untranslatable else estimate_messages(chat_payload["messages"])
            ask = AdmitAsk(resolution, prompt_tokens, request.max_output_tokens, call.request_id, "responses",
                           request_id is not None)
            call.tokens_estimate = prompt_tokens + (request.max_output_tokens or 0)
            routes = await self._admitted(call, principal, ask, upstream_key)
            if untranslatable is not None:
                routes = [r for r in routes if self._native(r[0])]
                if not routes:
                    raise untranslatable
            native = dict(payload)
            native.pop("trex", None)
            chat_payload.pop("trex", None)
            if call.ticket.downgraded:
                native["model"] = chat_payload["model"] = SMART_AUTO
            native_body, chat_body = _dumps(native), _dumps(chat_payload)

            def body_for(target: Target) -> tuple[str, bytes]:
                return ("responses", native_body) if self._native(target) else ("chat", chat_body)

            call.response_request = payload
            return await self._attempts(call, routes, body_for, True)

        call = Call(request_id or new_request_id(), "responses", client_ip)
        return await self._generation(call, raw, ResponsesRequest, check_responses_request, authorization,
                                      trace_carrier, serve)

    async def messages(self, raw: bytes, authorization: str | None, client_ip: str,
                       upstream_key: str | None = None, request_id: str | None = None,
                       trace_carrier: Mapping[str, str] | None = None,
                       client_headers: dict[str, str] | None = None) -> Answer:
        """Anthropic's Messages API: passed through to anthropic-format providers, translated to chat
        completions (and the answer back) by openai-format pools. Refusals in Anthropic's shape."""
        call = Call(request_id or new_request_id(), "messages", client_ip)
        call.client_headers = client_headers
        tracing.begin(call, trace_carrier)
        try:
            payload, request, principal, resolution = await self._front(
                call, raw, MessagesRequest, authorization, check_messages_request)
            prompt_tokens = estimate_prompt(payload)
            ask = AdmitAsk(resolution, prompt_tokens, request.max_tokens, call.request_id, "messages",
                           request_id is not None)
            call.tokens_estimate = prompt_tokens + request.max_tokens
            routes = await self._admitted(call, principal, ask, upstream_key)
            # The client's own bytes cross the hop: an anthropic-format pool sends them on as they
            # are (model rewritten, `trex` taken out), an openai-format one translates them. The
            # model is the route's in both (a downgrade to smart-auto included).
            answer = await self._attempts(call, routes, lambda _t: ("messages", raw), True)
        except TrexError as exc:
            await self._settle_failure(call)
            answer = self._error(call, exc)
        except Exception:
            answer = await self._internal_error(call)
        if answer.status >= 400 and answer.stream is None:
            answer.status, answer.body = anthropic_error_body(answer.status, answer.body)
        answer.headers.setdefault("request-id", call.request_id)
        return answer

    # ---- admission ----------------------------------------------------------------------------

    async def _admitted(self, call: Call, principal: Principal, ask: AdmitAsk,
                        override: str | None) -> list[Route]:
        """The routes to try, then admission (the ticket on ``call``): every generation route's
        step between parsing and the attempts."""
        routes = await self._routes(call, ask.resolution, override)
        with tracing.step(call, "trex.admission"):
            call.ticket, routes = await self._admit(call, principal, ask, routes, override)
        return routes

    async def _admit(self, call: Call, principal: Principal, ask: AdmitAsk, routes: list[Route],
                     override: str | None) -> tuple[Ticket, list[Route]]:
        try:
            return await self.gate.admit(principal, ask), routes
        except PaymentRequired as exc:
            if exc.code != "insufficient_credits" or principal.billing_policy != "downgrade" \
                    or ask.resolution.smart_auto or not self.catalog.smart_auto:
                raise
        # The key's policy says: serve it on Smart Auto (the daily quota) instead of refusing.
        downgraded = resolve(self.catalog, SMART_AUTO, None)
        ask.resolution = downgraded
        ticket = call.ticket = await self.gate.admit(principal, ask)
        ticket.downgraded = True
        return ticket, await self._routes(call, downgraded, override)

    # ---- attempts and fallback ----------------------------------------------------------------

    async def _keys(self, call: Call, targets: list[Target], override: str | None) -> list[Route]:
        usable: list[Route] = []
        missing: list[str] = []
        first = True
        for target in targets:
            # The caller's own upstream key applies to the provider that serves the request first.
            key = await self.gate.provider_key(call.principal, target.provider, override if first else None)  # type: ignore[arg-type]
            if key is None and not self._managed(target.provider):
                missing.append(target.provider)
                continue
            usable.append((target, key))
            first = False
        if not usable:
            names = ", ".join(sorted(set(missing)))
            raise BindingMissing(f"No provider key is bound for {names} and no managed route exists. "
                                 f"Bind a key for {names} or pass X-Upstream-Api-Key.",
                                 extra={"providers": sorted(set(missing))})
        return usable

    def _native(self, target: Target) -> bool:
        """Whether the target's provider serves the Responses API itself (`supports_responses`)."""
        spec = self.catalog.provider(target.provider)
        return spec is not None and spec.supports_responses

    def _managed(self, provider: str) -> bool:
        p = self.catalog.provider(provider)
        return p is not None and p.callable_without_binding()

    async def _routes(self, call: Call, resolution: Resolution, override: str | None) -> list[Route]:
        """The targets in the order to try, each with its key. Runs before admission: a request
        no provider can take (424, or 503 with every circuit open) moves no counter at all."""
        return await self._keys(call, self.planner.order(resolution), override)

    async def _attempts(self, call: Call, targets: list[Route],
                        body_for: Callable[[Target], tuple[str, bytes]], want_usage: bool) -> Answer:
        deadline = call.started + self.settings.request_deadline_s
        last: hop.HopResponse | None = None
        for target, key in targets[: self.settings.max_attempts]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            api, body = body_for(target)
            req = hop.HopRequest(call.request_id, target.provider, target.upstream_model, api,
                                 call.stream, want_usage, body, key,
                                 account_id=call.principal.account_id if call.principal else None,
                                 tokens_estimate=call.tokens_estimate, thinking=target.thinking,
                                 client_headers=call.client_headers)
            tracing.attempt_begin(call, target.provider, target.upstream_model, req)
            t0 = time.monotonic()
            try:
                async with asyncio.timeout(remaining):
                    resp = await self.caller(req)
            except (TimeoutError, hop.ReplicaUnreachable) as exc:
                failure = "timeout" if isinstance(exc, TimeoutError) else "pool_unreachable"
                if failure == "timeout":  # an unreachable pool replica says nothing about the provider
                    self.planner.observe(target.key, False)
                call.attempts.append(self._attempt(target, 504 if failure == "timeout" else 503, failure, t0))
                tracing.attempt_end(call)
                continue
            # Managed keys of this provider that answered 429/401/403 before another key served.
            call.attempts.extend(resp.extra.get("key_attempts", ()))
            if resp.failure == KEYS_EXHAUSTED:
                last = resp  # nothing reached this upstream on this step: not an attempt
                tracing.attempt_skipped(call, KEYS_EXHAUSTED)
                continue
            error = resp.failure or (None if resp.status == 200 else f"http_{resp.status}")
            call.attempts.append(self._attempt(target, resp.status, error, t0, resp.extra.get("key")))
            tracing.attempt_end(call, open_stream=resp.ok and resp.chunks is not None)
            # A provider that answered at all (even a 4xx of the caller's making) is up.
            self.planner.observe(target.key, resp.ok or not resp.retryable)
            if resp.ok:
                call.served = target
                # A Responses request served over chat completions is translated back here.
                call.translate = call.api == "responses" and api == "chat"
                return await self._success(call, resp)
            last = resp
            if not resp.retryable:
                return await self._passthrough(call, target, resp)
        return await self._all_failed(call, last)

    @staticmethod
    def _attempt(target: Target, status: int, error: str | None, t0: float,
                 key: str | None = None) -> dict[str, Any]:
        attempt = {"provider": target.provider, "model": target.upstream_model, "status": status,
                   "error": error, "latency_ms": round((time.monotonic() - t0) * 1000, 2)}
        if key is not None:
            attempt["key"] = key  # the managed key's id, never its secret
        return attempt
