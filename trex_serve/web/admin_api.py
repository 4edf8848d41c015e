"""The operator API, ``/admin/v1`` (CONTRACT.md sections 8 and 9).

``Authorization: Bearer <TREX_ADMIN_TOKEN>``; JSON in and out; errors are raised as ``TrexError``
and rendered into the OpenAI envelope by the application's exception handler.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import exc as sa_exc

from trex_serve.api.schemas import parse_model
from trex_serve.billing.balances import apply_live, credit_view
from trex_serve.billing.pricing import start_of_utc_day
from trex_serve.cache import MAX_TTL_S as MAX_CACHE_TTL_S
from trex_serve.errors import AuthError, InvalidRequest, NotFound, ServiceUnavailable
from trex_serve.store.repository import KeyLimits, Repository, credits, to_micro
from trex_serve.store.risk_settings import RiskSettings

log = logging.getLogger("trex.admin")

OnChange = Callable[[str, str], Awaitable[None]]
UsageExtra = Callable[[str], Awaitable[dict[str, Any]]]
OnCredits = Callable[[str, int], Awaitable[int | None]]  # -> the live balance, if known

MAX_CREDITS_PER_GRANT = 1_000_000_000.0


def reject_null(cls: Any, value: Any) -> Any:
    """PATCH fields may be left out, but an explicit null is a mistake worth a 400."""
    if value is None:
        raise ValueError("may not be null")
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateAccount(_Body):
    name: str = Field(min_length=1, max_length=200)
    plan: str | None = Field(default=None, min_length=1, max_length=64)
    subscription_state: Literal["trialing", "active", "past_due", "canceled"] = "active"
    risk: RiskSettings | None = None
    log_content: bool = False


class PatchAccount(_Body):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    state: Literal["active", "suspended"] | None = None
    subscription_state: Literal["trialing", "active", "past_due", "canceled"] | None = None
    plan: str | None = Field(default=None, min_length=1, max_length=64)
    risk: RiskSettings | None = None
    grace_until: datetime | None = None
    log_content: bool | None = None

    _not_null = field_validator("name", "state", "subscription_state", "plan", "log_content")(reject_null)


class CreateKey(_Body):
    """A new key as its account's owner may ask for it (account_api.py); the operator's adds the
    billing policy (OperatorCreateKey)."""

    name: str | None = Field(default=None, max_length=200)
    limits: KeyLimits | None = None
    models: list[str] | None = None
    expires_at: datetime | None = None
    risk: RiskSettings | None = None
    cache_ttl_s: int | None = Field(default=None, ge=0, le=MAX_CACHE_TTL_S)  # response cache default; 0 = off


class OperatorCreateKey(CreateKey):
    billing_policy: Literal["reject", "downgrade"] = "reject"


class PatchKey(_Body):
    name: str | None = Field(default=None, max_length=200)
    state: Literal["active", "inactive", "suspended", "revoked"] | None = None
    limits: KeyLimits | None = None
    models: list[str] | None = None
    expires_at: datetime | None = None
    risk: RiskSettings | None = None
    billing_policy: Literal["reject", "downgrade"] | None = None
    cache_ttl_s: int | None = Field(default=None, ge=0, le=MAX_CACHE_TTL_S)  # 0 or null: off

    _not_null = field_validator("state", "billing_policy")(reject_null)


class PutBinding(_Body):
    api_key: str = Field(min_length=1, max_length=4096)
    key_ids: list[str] | None = None


class GrantCredits(_Body):
    amount: float = Field(gt=0)
    reason: str | None = Field(default=None, max_length=500)

    @field_validator("amount")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value) or value > MAX_CREDITS_PER_GRANT:
            raise ValueError(f"must be a finite number up to {MAX_CREDITS_PER_GRANT:g}")
        if to_micro(value) < 1:
            raise ValueError("must be at least 0.000001")
        return value


def _dump(model: BaseModel) -> dict[str, Any]:
    """The fields the client sent, as plain JSON-able values (for the repository)."""
    out: dict[str, Any] = {}
    for name in model.model_fields_set:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            value = value.model_dump(exclude_unset=True, exclude_none=True)
        out[name] = value
    return out


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None


def _int_query(request: Request, name: str, default: int, lo: int = 1, hi: int = 1000) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be an integer", param=name) from None
    if value < lo or value > hi:
        raise InvalidRequest(f"'{name}' must be between {lo} and {hi}", param=name)
    return value


def operator_guard(admin_token: str) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency admitting only ``Authorization: Bearer <admin_token>``."""
    token_bytes = admin_token.encode("utf-8") if admin_token else b""

    async def require_operator(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if not token_bytes:
            raise AuthError("The operator API is disabled: TREX_ADMIN_TOKEN is not set.")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode("utf-8"), token_bytes):
            raise AuthError("Invalid or missing operator token.")

    return require_operator


def build_admin_router(
    repo: Repository,
    admin_token: str,
    on_change: OnChange | None = None,
    *,
    usage_extra: UsageExtra | None = None,
    on_credits: OnCredits | None = None,
    known_providers: Callable[[], Iterable[str]] | None = None,
) -> APIRouter:
    """The ``/admin/v1`` router.

    - ``on_change(kind, id)`` is awaited after every committed change that affects auth:
      ``("key", key_id)`` or ``("account", account_id)`` (bindings count as account changes).
    - ``usage_extra(account_id)`` supplies live figures (Redis); its dict is merged into the
      ``/usage`` response (return ``{"quota": {...}, ...}``).
    - ``on_credits(account_id, amount_micro)`` is awaited after a grant is committed (credit the
      live balance).
    - ``known_providers()`` lists catalog providers; when given, bindings to others are refused.
    """
    router = APIRouter(prefix="/admin/v1", dependencies=[Depends(operator_guard(admin_token))], tags=["admin"])

    async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError,
                sa_exc.TimeoutError) as exc:
            # The database is down or unreachable: a retryable 503 envelope, not a bare 500.
            log.warning("operator API: database unavailable (%s)", type(exc).__name__)
            raise ServiceUnavailable("The control-plane database is unavailable; try again shortly.",
                                     code="store_unavailable", retry_after=1) from None

    async def changed(kind: str, ident: str) -> None:
        if on_change is None:
            return
        try:
            await on_change(kind, ident)
        except Exception:  # the change is committed; caches fall back to their TTL
            log.exception("on_change(%s, %s) failed", kind, ident)

    async def account_or_404(account_id: str) -> dict[str, Any]:
        acc = await call(repo.get_account, account_id)
        if acc is None:
            raise NotFound(f"No account {account_id!r}", param="account_id")
        return acc

    # ------------------------------------------------------------ plans

    @router.get("/plans")
    async def list_plans() -> dict[str, Any]:
        return {"object": "list", "data": await call(repo.list_plans)}

    # ------------------------------------------------------------ accounts

    @router.post("/accounts", status_code=201)
    async def create_account(request: Request) -> JSONResponse:
        body = parse_model(CreateAccount, await _json_body(request))
        plan = body.plan or await call(repo.default_plan)
        if plan is None:
            raise InvalidRequest("No plans are configured in the catalog.", param="plan")
        acc = await call(
            repo.create_account, body.name, plan,
            subscription_state=body.subscription_state,
            risk=body.risk.model_dump(exclude_unset=True, exclude_none=True) if body.risk else None,
            log_content=body.log_content,
        )
        return JSONResponse(acc, status_code=201)

    @router.get("/accounts")
    async def list_accounts(request: Request) -> dict[str, Any]:
        limit = _int_query(request, "limit", 1000, hi=10000)
        return {"object": "list", "data": await call(repo.list_accounts, limit)}

    @router.get("/accounts/{account_id}")
    async def get_account(account_id: str) -> dict[str, Any]:
        return await account_or_404(account_id)

    @router.patch("/accounts/{account_id}")
    async def patch_account(account_id: str, request: Request) -> dict[str, Any]:
        body = parse_model(PatchAccount, await _json_body(request))
        before, after = await call(repo.update_account, account_id, **_dump(body))
        if before != after:
            await changed("account", account_id)
        return after

    # ------------------------------------------------------------ keys

    @router.post("/accounts/{account_id}/keys", status_code=201)
    async def create_key(account_id: str, request: Request) -> JSONResponse:
        body = parse_model(OperatorCreateKey, await _json_body(request))
        fields = _dump(body)
        key, plaintext = await call(repo.create_key, account_id, **fields)
        await changed("key", key["id"])
        return JSONResponse(dict(key, key=plaintext), status_code=201)

    @router.get("/accounts/{account_id}/keys")
    async def list_keys(account_id: str) -> dict[str, Any]:
        return {"object": "list", "data": await call(repo.list_keys, account_id)}

    @router.get("/keys/{key_id}")
    async def get_key(key_id: str) -> dict[str, Any]:
        key = await call(repo.get_key, key_id)
        if key is None:
            raise NotFound(f"No API key {key_id!r}", param="key_id")
        return key

    @router.patch("/keys/{key_id}")
    async def patch_key(key_id: str, request: Request) -> dict[str, Any]:
        body = parse_model(PatchKey, await _json_body(request))
        before, after = await call(repo.update_key, key_id, **_dump(body))
        if before != after:
            await changed("key", key_id)
        return after

    @router.delete("/keys/{key_id}")
    async def revoke_key(key_id: str) -> dict[str, Any]:
        before, after = await call(repo.update_key, key_id, state="revoked")
        if before != after:
            await changed("key", key_id)
        return after

    # ------------------------------------------------------------ provider bindings

    def check_provider(provider: str) -> None:
        if known_providers is None:
            return
        known = set(known_providers())
        if provider not in known:
            raise InvalidRequest(
                f"Unknown provider {provider!r} (known: {', '.join(sorted(known))})", param="provider"
            )

    @router.put("/accounts/{account_id}/bindings/{provider}")
    async def put_binding(account_id: str, provider: str, request: Request) -> dict[str, Any]:
        body = parse_model(PutBinding, await _json_body(request))
        check_provider(provider)
        out = await call(repo.put_binding, account_id, provider, body.api_key, body.key_ids)
        await changed("account", account_id)
        return out

    @router.delete("/accounts/{account_id}/bindings/{provider}")
    async def delete_binding(account_id: str, provider: str) -> dict[str, Any]:
        out = await call(repo.delete_binding, account_id, provider)
        await changed("account", account_id)
        return dict(out, deleted=True)

    @router.get("/accounts/{account_id}/bindings")
    async def list_bindings(account_id: str) -> dict[str, Any]:
        return {"object": "list", "data": await call(repo.list_bindings, account_id)}

    # ------------------------------------------------------------ credits and usage

    @router.post("/accounts/{account_id}/credits")
    async def grant_credits(account_id: str, request: Request) -> dict[str, Any]:
        body = parse_model(GrantCredits, await _json_body(request))
        amount_micro = to_micro(body.amount)
        row = await call(repo.grant_credits, account_id, amount_micro, body.reason or "operator grant")
        live = None
        if on_credits is not None:
            try:
                live = await on_credits(account_id, amount_micro)
            except Exception:
                log.exception("on_credits(%s) failed", account_id)
        # Read your writes: the live balance (every answered request in it) when Redis has one.
        balance = live if isinstance(live, int) else await call(repo.ledger_sum, account_id)
        return {"account_id": account_id, "balance": credits(balance), "balance_micro": balance,
                "ledger": row}

    @router.get("/accounts/{account_id}/ledger")
    async def list_ledger(account_id: str, request: Request) -> dict[str, Any]:
        limit = _int_query(request, "limit", 50)
        await account_or_404(account_id)
        return {"object": "list", "data": await call(repo.list_ledger, account_id, limit)}

    @router.get("/accounts/{account_id}/usage")
    async def usage(account_id: str) -> dict[str, Any]:
        acc = await account_or_404(account_id)
        out: dict[str, Any] = {"account_id": account_id, "plan": acc["plan"], "quota": {},
                               "tokens_today": await call(repo.token_totals, account_id, start_of_utc_day())}
        if usage_extra is not None:
            try:
                apply_live(out, await usage_extra(account_id))  # the ledger's totals come with it
                return out
            except Exception:
                log.exception("usage_extra(%s) failed", account_id)
                out["quota"] = {"error": "live counters unavailable"}
        out["credits"] = credit_view(await call(repo.ledger_totals, account_id))
        return out

    # ------------------------------------------------------------ logs, audit, risk

    @router.get("/accounts/{account_id}/logs")
    async def logs(account_id: str, request: Request) -> dict[str, Any]:
        q = request.query_params
        limit = _int_query(request, "limit", 50)
        await account_or_404(account_id)
        rows = await call(
            repo.query_logs, account_id, limit=limit, before=q.get("before") or None,
            status=q.get("status") or None, model=q.get("model") or None,
            key_id=q.get("key_id") or None, since=q.get("since") or None,
        )
        return {"object": "list", "data": rows,
                "next_before": rows[-1]["request_id"] if len(rows) == limit else None}

    @router.get("/audit")
    async def audit(request: Request) -> dict[str, Any]:
        limit = _int_query(request, "limit", 50)
        account_id = request.query_params.get("account_id") or None
        return {"object": "list", "data": await call(repo.list_audit, limit, account_id)}

    @router.get("/accounts/{account_id}/risk-events")
    async def risk_events(account_id: str, request: Request) -> dict[str, Any]:
        limit = _int_query(request, "limit", 50)
        await account_or_404(account_id)
        return {"object": "list", "data": await call(repo.list_risk_events, account_id, limit)}

    return router
