"""The production Gate: API keys from the SQL store through an in-process cache (invalidated over
Redis pub/sub), and admission, billing and risk counters in Redis (one round trip each way)."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from trex_serve.admission.client_ip import parse_networks
from trex_serve.admission.counters import CONCURRENCY_LIMIT_EXCEEDED, AdmitRequest, CounterStore, SettleRequest
from trex_serve.admission.gate import AdmitAsk, Principal, Settlement, Ticket
from trex_serve.billing import pricing as billing
from trex_serve.billing.prices import price_book
from trex_serve.catalog import Catalog, Plan
from trex_serve.errors import (
    AuthError,
    IpNotAllowed,
    ModelNotFound,
    PaymentRequired,
    RateLimited,
    RequestLimitExceeded,
    ServiceUnavailable,
)
from trex_serve.routing.resolve import SMART_AUTO, Resolution
from trex_serve.store.repository import KeyContext, Repository
from trex_serve.store.risk_settings import RiskSettings

log = logging.getLogger("trex.gate")

CACHE_TTL_S = 30.0  # a safety net; invalidations normally arrive within milliseconds
STALE_SERVE_S = 300.0  # how long cached keys keep serving while the database is down
# How long a settled front-assigned request id is remembered: the front proxy replays a request
# within moments of losing its replica; this only has to outlast that.
REPLAY_MARK_TTL_S = 600
# How long a concurrency refusal waits before asking once more (see admit): far longer than Redis
# takes to read a settlement already written on another connection, short for a refused client.
SETTLE_GRACE_S = 0.02


def _strictest(a: float | int | None, b: float | int | None) -> float | int | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


class KeyGate:
    def __init__(self, catalog: Catalog, repo: Repository, counters: CounterStore, *,
                 auth_failures_per_minute: int = 20,
                 risk_event: Callable[[dict[str, Any]], Any] | None = None) -> None:
        self.catalog = catalog
        self.repo = repo
        self.counters = counters
        self.auth_failures_per_minute = auth_failures_per_minute
        self.risk_event = risk_event or (lambda _row: None)
        self.prices = price_book(catalog)
        self._cache: dict[str, tuple[KeyContext, float]] = {}
        self._secrets: dict[tuple[str, str, str], str | None] = {}
        self._parsed_risk: dict[int, tuple[KeyContext, RiskSettings | None, RiskSettings | None]] = {}
        self.suspensions = 0

    # ---- cache and invalidation ----------------------------------------------------------------

    def invalidate(self, kind: str, ident: str) -> None:
        if kind == "*" or not ident:
            self._cache.clear()
            self._secrets.clear()
            return
        for digest, (ctx, _) in list(self._cache.items()):
            if (kind == "key" and ctx.key_id == ident) or (kind == "account" and ctx.account_id == ident):
                self._cache.pop(digest, None)
        for triple in list(self._secrets):
            if triple[0] == ident or triple[1] == ident:
                self._secrets.pop(triple, None)

    async def _lookup(self, plaintext: str) -> KeyContext | None:
        digest = hashlib.sha256(plaintext.encode()).hexdigest()
        hit = self._cache.get(digest)
        now = time.monotonic()
        if hit is not None and now - hit[1] < CACHE_TTL_S:
            return hit[0]
        try:
            ctx = await asyncio.to_thread(self.repo.lookup_key, plaintext)
        except Exception:
            if hit is not None and now - hit[1] < STALE_SERVE_S:
                log.warning("database unavailable: serving key %s from cache", hit[0].prefix)
                return hit[0]
            from trex_serve.errors import ServiceUnavailable
            raise ServiceUnavailable("The key store is unavailable; try again shortly.",
                                     code="store_unavailable") from None
        if ctx is not None:
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[digest] = (ctx, now)
        return ctx

    # ---- authentication ------------------------------------------------------------------------

    async def authenticate(self, authorization: str | None, client_ip: str) -> Principal:
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        ctx = await self._lookup(token) if scheme.lower() == "bearer" and token else None
        if ctx is None:
            blocked, retry_after = await self.counters.auth_failure(client_ip, self.auth_failures_per_minute)
            if blocked:
                raise RateLimited("Too many failed authentications from this address.",
                                  code="too_many_auth_failures", retry_after=max(1, int(retry_after or 60)))
            raise AuthError("Incorrect API key provided." if token else
                            "Missing API key: send 'Authorization: Bearer <key>'.")
        now = datetime.now(UTC)
        if ctx.state == "revoked":
            raise AuthError("This API key has been revoked.", code="api_key_revoked")
        if ctx.state == "suspended":
            raise AuthError("This API key is suspended.", code="api_key_suspended")
        if ctx.state != "active" or ctx.expired(now):
            raise AuthError("This API key is inactive or expired.", code="api_key_inactive")
        self._check_ip(ctx, client_ip)
        if ctx.account_state != "active":
            raise AuthError("This account is suspended.", code="account_suspended")
        sub = ctx.subscription_state
        if sub == "canceled" or (sub == "past_due" and not ctx.in_grace(now)):
            raise PaymentRequired("The account's subscription is not active.", code="subscription_inactive")
        return Principal(ctx.key_id, ctx.account_id, ctx.prefix, ctx.plan,
                         frozenset(ctx.models) if ctx.models is not None else None,
                         ctx.billing_policy, ctx.log_content, ctx)

    def _risk_pair(self, ctx: KeyContext) -> tuple[RiskSettings | None, RiskSettings | None]:
        """Parsed once per cached key snapshot: validation is not free on the hot path."""
        cached = self._parsed_risk.get(id(ctx))
        if cached is None or cached[0] is not ctx:
            key = RiskSettings.model_validate(ctx.risk) if ctx.risk else None
            acc = RiskSettings.model_validate(ctx.account_risk) if ctx.account_risk else None
            if len(self._parsed_risk) > 100_000:
                self._parsed_risk.clear()
            cached = self._parsed_risk[id(ctx)] = (ctx, key, acc)
        return cached[1], cached[2]

    def _risks(self, ctx: KeyContext) -> list[RiskSettings]:
        return [r for r in self._risk_pair(ctx) if r is not None]

    def _check_ip(self, ctx: KeyContext, client_ip: str) -> None:
        for risk in self._risks(ctx):
            if risk.allowed_ips is None:
                continue
            nets = parse_networks(tuple(risk.allowed_ips))
            try:
                ip = ipaddress.ip_address(client_ip)
            except ValueError:
                ip = None
            if ip is None or not any(ip in n for n in nets):
                self.risk_event({"account_id": ctx.account_id, "key_id": ctx.key_id, "kind": "ip_refused",
                                 "detail": {"ip": client_ip}})
                raise IpNotAllowed(f"Requests from {client_ip} are not allowed for this key.")

    # ---- models --------------------------------------------------------------------------------

    def _plan(self, principal: Principal) -> Plan:
        plan = self.catalog.plan(principal.plan)
        return plan or self.catalog.plans[0]

    def _model_allowed(self, principal: Principal, model_id: str) -> bool:
        if principal.allowed_models is not None and model_id not in principal.allowed_models:
            return False
        if model_id == SMART_AUTO:
            return bool(self.catalog.smart_auto)
        model = self.catalog.model(model_id)
        if model is None or (model.tier == "premium" and not self._plan(principal).premium):
            return False
        bound = principal.context.bound_providers if principal.context else frozenset()
        return any(self._callable(c.provider, bound) for c in model.candidates)

    def _callable(self, provider: str, bound: frozenset[str]) -> bool:
        spec = self.catalog.provider(provider)
        return spec is not None and (provider in bound or spec.callable_without_binding())

    def visible_models(self, principal: Principal) -> list[str]:
        ids = [SMART_AUTO] + [m.id for m in self.catalog.models]
        return [i for i in ids if self._model_allowed(principal, i)]

    def check_model(self, principal: Principal, resolution: Resolution) -> None:
        requested = SMART_AUTO if resolution.smart_auto else resolution.public_model
        if principal.allowed_models is not None and requested not in principal.allowed_models:
            raise ModelNotFound(f"The model '{requested}' does not exist or you do not have access to it.",
                                param="model")
        if resolution.primary.tier == "premium" and not self._plan(principal).premium:
            raise ModelNotFound(f"The model '{requested}' is not available on your plan.", param="model")

    # ---- admission -----------------------------------------------------------------------------

    def _ceilings(self, ctx: KeyContext, ask: AdmitAsk) -> tuple[list[RiskSettings], int | None]:
        """The per-request ceilings (CONTRACT.md section 9): refused before any counter moves.
        Returns the key's risk settings and its output ceiling."""
        risks = self._risks(ctx)
        max_out = min((r.max_output_tokens for r in risks if r.max_output_tokens), default=None)
        max_prompt = min((r.max_prompt_tokens for r in risks if r.max_prompt_tokens), default=None)
        if max_out is not None and (ask.max_output_tokens or 0) > max_out:
            param = "max_output_tokens" if ask.api == "responses" else "max_tokens"
            raise RequestLimitExceeded(f"{param} exceeds this key's ceiling of {max_out}.", param=param)
        if max_prompt is not None and ask.prompt_tokens > max_prompt:
            param = "input" if ask.api == "responses" else "messages"
            raise RequestLimitExceeded(f"The prompt (~{ask.prompt_tokens} tokens) exceeds this key's ceiling "
                                       f"of {max_prompt} tokens.", param=param)
        return risks, max_out

    async def admit_hit(self, principal: Principal, ask: AdmitAsk) -> Ticket:
        """A request answered from the response cache: the same ceilings, then one request against
        RPM and nothing else (no tokens, no lease, no quota, no credits; nothing to settle)."""
        ctx: KeyContext = principal.context
        self._ceilings(ctx, ask)
        rpm = _strictest((ctx.limits or {}).get("rpm"), self._plan(principal).rpm) or None
        result = await self.counters.admit_hit(ctx.key_id, rpm)
        headers = result.rate_limit_headers()
        if not result.ok:
            self._refuse(result, ctx, headers)
        return Ticket(principal, "none", ask.request_id, headers=headers)

    async def admit(self, principal: Principal, ask: AdmitAsk) -> Ticket:
        ctx: KeyContext = principal.context
        plan = self._plan(principal)
        risks, max_out = self._ceilings(ctx, ask)
        res = ask.resolution
        model = res.primary
        credits = (model.tier == "premium" or res.pinned or not plan.standard_uses_quota
                   or (plan.long_context_tokens is not None and ask.prompt_tokens > plan.long_context_tokens))
        out_tokens = ask.max_output_tokens or (max_out if max_out else None)
        prices = [self.prices.for_target(t.model, t.provider, t.upstream_model, principal.plan) for t in res.targets]
        reserve = max(billing.reserve_micro(ask.prompt_tokens, out_tokens, p.input, p.output,
                                            context_window=model.context_window) for p in prices)
        limits = ctx.limits or {}
        key_risk, acc_risk = self._risk_pair(ctx)

        def cap(r: RiskSettings | None, field: str) -> int | None:
            value = getattr(r, field) if r else None
            return billing.micro_from_credits(value) if value is not None else None

        alert_at = min((r.alert_at for r in risks), default=0.8)
        req = AdmitRequest(
            request_id=ask.request_id, key_id=ctx.key_id, account_id=ctx.account_id,
            billing="credits" if credits else "quota",
            rpm=_strictest(limits.get("rpm"), plan.rpm) or None,
            tpm=_strictest(limits.get("tpm"), plan.tpm) or None,
            tokens_estimate=billing.tokens_estimate(ask.prompt_tokens, out_tokens),
            concurrency=_strictest(limits.get("concurrency"), plan.concurrency),
            burst_concurrency=plan.burst_concurrency if limits.get("concurrency") is None
            else _strictest(limits.get("concurrency"), plan.burst_concurrency),
            quota_requests=plan.daily_quota.requests, quota_tokens=plan.daily_quota.tokens,
            reserve_micro=reserve,
            key_daily_cap_micro=cap(key_risk, "daily_spend_cap"),
            key_monthly_cap_micro=cap(key_risk, "monthly_spend_cap"),
            account_daily_cap_micro=cap(acc_risk, "daily_spend_cap"),
            account_monthly_cap_micro=cap(acc_risk, "monthly_spend_cap"),
            alert_at=alert_at,
        )
        result = await self.counters.admit(req, balance_loader=self._balance)
        if not result.ok and result.code == CONCURRENCY_LIMIT_EXCEEDED:
            # The slot may be held by a request whose answer the client already has: its settlement
            # leaves before the answer, but on another replica's connection, which Redis can read
            # after this one. A refusal changed nothing in Redis, so asking again once is safe.
            await asyncio.sleep(SETTLE_GRACE_S)
            result = await self.counters.admit(req, balance_loader=self._balance)
        for alert in result.alerts:
            self.risk_event({"account_id": ctx.account_id, "key_id": ctx.key_id, "kind": "spend_alert",
                             "detail": {"scope": alert.scope, "period": alert.period,
                                        "cap_micro": alert.cap_micro, "spent_micro": alert.spent_micro}})
        headers = result.rate_limit_headers()
        if not result.ok:
            self._refuse(result, ctx, headers)
        return Ticket(principal, result.billing or req.billing, ask.request_id, ask.prompt_tokens,
                      result.reserved_micro, result.lease_id, headers,
                      state={"velocity": key_risk.velocity if key_risk else None, "slot": result.slot},
                      replayable=ask.replayable, replay=result.replay)

    async def _balance(self, account_id: str) -> int:
        # The ledger, then the charges still on their way to it. A row leaves the unbooked count only
        # after its commit, so read in this order a row is missed only if it is both committed and
        # acknowledged between the two reads (`billing reconcile` would report it).
        booked = await asyncio.to_thread(self.repo.ledger_sum, account_id)
        return booked - await self.counters.unbooked(account_id)

    def _refuse(self, result, ctx: KeyContext, headers: dict[str, str]) -> None:
        code = result.code
        retry = result.retry_after
        if code == "rate_limit_exceeded":
            raise RateLimited("Rate limit reached for requests or tokens per minute.", retry_after=retry,
                              headers=headers)
        if code == "concurrency_limit_exceeded":
            raise RateLimited("Too many concurrent requests for this key.", code=code, retry_after=retry or 1,
                              headers=headers)
        if code == "insufficient_quota":
            raise RateLimited("The daily Smart Auto quota is used up.", code=code, type="insufficient_quota",
                              retry_after=retry, headers=headers)
        if code == "spend_limit_exceeded":
            hit = result.cap_hit
            self.risk_event({"account_id": ctx.account_id, "key_id": ctx.key_id, "kind": "spend_cap_reached",
                             "detail": {"scope": hit.scope, "period": hit.period, "cap_micro": hit.cap_micro,
                                        "spent_micro": hit.spent_micro} if hit else {}})
            raise PaymentRequired("The spend cap for this period is reached.", code=code, retry_after=retry,
                                  headers=headers)
        if code == "insufficient_credits":
            raise PaymentRequired("Not enough Compute Credits for this request.", headers=headers)
        if code == "api_key_suspended":  # over its velocity limit; the suspension is on its way to SQL
            raise AuthError("This API key is suspended.", code="api_key_suspended")
        from trex_serve.errors import ServiceUnavailable
        raise ServiceUnavailable(f"Admission failed ({code}).", code="admission_unavailable")

    # ---- provider keys -------------------------------------------------------------------------

    async def provider_key(self, principal: Principal, provider: str, override: str | None) -> str | None:
        if override:
            return override
        ctx: KeyContext = principal.context
        if provider in ctx.bound_providers:
            triple = (ctx.key_id, ctx.account_id, provider)
            if triple not in self._secrets:
                self._secrets[triple] = await asyncio.to_thread(
                    self.repo.binding_secret, ctx.account_id, ctx.key_id, provider)
            secret = self._secrets[triple]
            if secret:
                return secret
        spec = self.catalog.provider(provider)
        if spec is None or spec.keys:
            return None  # a pool of managed keys: the key is chosen per request, its secret stays in the pool
        return spec.managed_key()

    # ---- settlement ----------------------------------------------------------------------------

    async def first_delivery(self, request_id: str) -> bool:
        """False when this front-assigned request id was seen before (a replay); fails open when Redis
        cannot say, since the guard only matters for replays."""
        try:
            return await self.counters.first_delivery(request_id, REPLAY_MARK_TTL_S)
        except ServiceUnavailable:
            return True

    async def settle(self, ticket: Ticket, settlement: Settlement, sent: asyncio.Future | None = None) -> int:
        charge = 0
        model = self.catalog.model(settlement.public_model) if settlement.public_model else None
        usage = settlement.usage
        if settlement.success and ticket.billing == "credits" and model is not None:
            prices = self.prices.for_target(model, settlement.provider, settlement.upstream_model,
                                            ticket.principal.plan)
            charge = billing.charge_micro(usage, prices)
        velocity = ticket.state.get("velocity")
        plan = self._plan(ticket.principal)
        result = await self.counters.settle(SettleRequest(
            request_id=ticket.request_id, success=settlement.success,
            tokens_in=usage.prompt_tokens - (usage.cache_read_tokens if plan.quota_tokens == "uncached" else 0),
            tokens_out=usage.completion_tokens, charge_micro=charge, usage=usage.classes(),
            velocity_window_s=velocity.window_s if velocity else None,
            velocity_max_micro=billing.micro_from_credits(velocity.max_credits) if velocity else None,
            replay_ttl_s=REPLAY_MARK_TTL_S if ticket.replayable else 0,
            # The charge's ledger row: settle.lua appends it to the ledger stream in the same step.
            reason=f"{settlement.public_model} {usage.summary()}"),
            sent)
        ctx: KeyContext = ticket.principal.context
        if result.velocity_exceeded:
            await self._suspend(ctx, result.velocity_micro, velocity)
        return result.charged_micro

    async def _suspend(self, ctx: KeyContext, spent_micro: int, velocity: Any) -> None:
        detail = {"reason": "velocity", "window_s": velocity.window_s, "max_credits": velocity.max_credits,
                  "spent_credits": float(billing.credits_from_micro(spent_micro))}
        changed = await asyncio.to_thread(self.repo.auto_suspend_key, ctx.key_id, "auto_suspended", detail)
        if changed:
            self.suspensions += 1
            self.invalidate("key", ctx.key_id)
            await self.counters.publish_invalidation("key", ctx.key_id)
        # Suspended in SQL and announced (or no longer active anyway): authentication refuses the
        # key now, so admission's stop mark (settle.lua) can go — an operator may reinstate it.
        await self.counters.lift_velocity_stop(ctx.key_id)
