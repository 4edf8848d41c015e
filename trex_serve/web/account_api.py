"""The account API, ``/v1/dashboard`` (CONTRACT.md section 6): what an account owner manages alone.

``Authorization: Bearer <owner_token>`` (returned once by ``POST /admin/v1/accounts``). Every route
works on the token's own account only: an id that belongs to another account is answered 404, the
same as an id that does not exist, so nothing leaks about other accounts. The operator token is
accepted too, with ``?account_id=`` naming the account to view (the operator's view of the page).

Changes that affect authentication are announced through ``on_change`` (like the operator API)
and leave audit rows with actor ``owner`` (or ``operator`` in the operator's view).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import Field, field_validator

from trex_serve.api.schemas import parse_model
from trex_serve.billing.balances import apply_live, credit_view
from trex_serve.billing.pricing import start_of_utc_day
from trex_serve.cache import MAX_TTL_S as MAX_CACHE_TTL_S
from trex_serve.catalog import Catalog
from trex_serve.errors import AuthError, Conflict, InvalidRequest, NotFound
from trex_serve.store.models import RequestLog
from trex_serve.store.repository import Repository, as_utc
from trex_serve.web.admin_api import CreateKey, PutBinding, _Body, _dump, _int_query, _json_body, reject_null

log = logging.getLogger("trex.account")

MAX_TRAFFIC_MINUTES = 24 * 60
MAX_TRAFFIC_ROWS = 200_000


class PatchKey(_Body):
    """An owner may pause and resume a key and choose its response-cache default; suspension and its
    lifting belong to the operator."""

    name: str | None = Field(default=None, max_length=200)
    state: Literal["active", "inactive"] | None = None
    cache_ttl_s: int | None = Field(default=None, ge=0, le=MAX_CACHE_TTL_S)  # 0 or null: off

    _not_null = field_validator("state")(reject_null)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the account they may see, and the actor name written to the audit trail."""

    account_id: str
    actor: str


def _bearer(request: Request) -> str:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise AuthError("Missing owner token: send 'Authorization: Bearer <owner token>'.")
    return value.strip()


def _percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), int(-(-fraction * len(sorted_values) // 1))))
    return round(sorted_values[rank - 1], 1)


def traffic_buckets(engine: sa.Engine, account_id: str, minutes: int,
                    now: datetime | None = None) -> dict[str, Any]:
    """Per-minute requests, errors (status >= 400), fallbacks (attempts > 1) and p50/p95 latency of
    one account's request logs over the last ``minutes``, oldest bucket first (empty minutes are 0)."""
    now = (now or datetime.now(UTC)).replace(second=0, microsecond=0)
    start = now - timedelta(minutes=minutes - 1)
    logs = RequestLog.__table__
    query = (
        sa.select(logs.c.created_at, logs.c.status, logs.c.attempts, logs.c.latency_ms)
        .where(logs.c.account_id == account_id, logs.c.created_at >= start)
        .order_by(logs.c.created_at.desc())
        .limit(MAX_TRAFFIC_ROWS)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    buckets = [{"t": (start + timedelta(minutes=i)).isoformat(), "requests": 0, "errors": 0,
                "fallbacks": 0, "p50_ms": None, "p95_ms": None} for i in range(minutes)]
    latencies: list[list[float]] = [[] for _ in range(minutes)]
    for created_at, status, attempts, latency_ms in rows:
        at = as_utc(created_at)
        if at is None:
            continue
        index = int((at - start).total_seconds() // 60)
        if not 0 <= index < minutes:
            continue
        bucket = buckets[index]
        bucket["requests"] += 1
        bucket["errors"] += int((status or 0) >= 400)
        bucket["fallbacks"] += int((attempts or 0) > 1)
        latencies[index].append(float(latency_ms or 0.0))
    for bucket, values in zip(buckets, latencies, strict=True):
        values.sort()
        bucket["p50_ms"] = _percentile(values, 0.50)
        bucket["p95_ms"] = _percentile(values, 0.95)
    totals = {name: sum(b[name] for b in buckets) for name in ("requests", "errors", "fallbacks")}
    return {"object": "traffic", "account_id": account_id, "minutes": minutes, "start": start.isoformat(),
            "buckets": buckets, "totals": totals, "truncated": len(rows) >= MAX_TRAFFIC_ROWS}


def build_account_router(repo: Repository, admin_token: str | None, catalog: Callable[[], Catalog],
                         on_change: Callable[[str, str], Awaitable[None]],
                         live_usage: Callable[[str], Awaitable[dict[str, Any]]]) -> APIRouter:
    """The ``/v1/dashboard`` router, bound to one replica's collaborators: ``catalog`` returns the
    live catalog, ``on_change`` announces an auth-relevant change, ``live_usage`` reads live counters."""
    admin_token = admin_token or ""

    async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def principal(request: Request) -> Principal:
        token = _bearer(request)
        if admin_token and hmac.compare_digest(token.encode("utf-8"), admin_token.encode("utf-8")):
            account_id = request.query_params.get("account_id") or ""
            if not account_id:
                raise InvalidRequest("The operator view needs ?account_id=.", param="account_id")
            if await call(repo.get_account, account_id) is None:
                raise NotFound(f"No account {account_id!r}", param="account_id")
            return Principal(account_id, "operator")
        account_id = await call(repo.lookup_owner_token, token)
        if account_id is None:
            raise AuthError("Invalid owner token.")
        return Principal(account_id, "owner")

    router = APIRouter(prefix="/v1/dashboard", tags=["account"])
    Me = Depends(principal)

    async def changed(kind: str, ident: str) -> None:
        try:
            await on_change(kind, ident)
        except Exception:  # committed; caches fall back to their TTL
            log.exception("on_change(%s, %s) failed", kind, ident)

    async def own_key(me: Principal, key_id: str) -> dict[str, Any]:
        key = await call(repo.get_key, key_id)
        if key is None or key["account_id"] != me.account_id:
            raise NotFound(f"No API key {key_id!r}", param="key_id")
        return key

    def check_provider(provider: str) -> None:
        known = {p.name for p in catalog().providers}
        if provider not in known:
            raise InvalidRequest(f"Unknown provider {provider!r} (known: {', '.join(sorted(known))})",
                                 param="provider")

    # ------------------------------------------------------------ account

    @router.get("/account")
    async def account(me: Principal = Me) -> dict[str, Any]:
        acc = await call(repo.get_account, me.account_id)
        if acc is None:
            raise NotFound(f"No account {me.account_id!r}", param="account_id")
        plan = catalog().plan(acc["plan"])
        return {
            "object": "account_view",
            "viewer": me.actor,
            "account": acc,
            "plan": plan.model_dump() if plan else {"name": acc["plan"]},
            "subscription": {"state": acc["subscription_state"], "grace_until": acc["grace_until"]},
            "providers": sorted(p.name for p in catalog().providers),
        }

    # ------------------------------------------------------------ keys

    @router.get("/keys")
    async def list_keys(me: Principal = Me) -> dict[str, Any]:
        return {"object": "list", "data": await call(repo.list_keys, me.account_id)}

    @router.post("/keys", status_code=201)
    async def create_key(request: Request, me: Principal = Me) -> JSONResponse:
        body = parse_model(CreateKey, await _json_body(request))
        key, plaintext = await call(repo.create_key, me.account_id, **_dump(body), actor=me.actor)
        await changed("key", key["id"])
        return JSONResponse(dict(key, key=plaintext), status_code=201)

    @router.patch("/keys/{key_id}")
    async def patch_key(key_id: str, request: Request, me: Principal = Me) -> dict[str, Any]:
        body = parse_model(PatchKey, await _json_body(request))
        key = await own_key(me, key_id)
        if body.state is not None and key["state"] in ("suspended", "revoked") and body.state != key["state"]:
            raise Conflict(f"A {key['state']} key cannot be changed here"
                           + ("; an operator resumes it." if key["state"] == "suspended" else "."),
                           param="state")
        before, after = await call(repo.update_key, key_id, actor=me.actor, **_dump(body))
        if before != after:
            await changed("key", key_id)
        return after

    @router.delete("/keys/{key_id}")
    async def revoke_key(key_id: str, me: Principal = Me) -> dict[str, Any]:
        await own_key(me, key_id)
        before, after = await call(repo.update_key, key_id, actor=me.actor, state="revoked")
        if before != after:
            await changed("key", key_id)
        return after

    # ------------------------------------------------------------ provider bindings

    @router.get("/bindings")
    async def list_bindings(me: Principal = Me) -> dict[str, Any]:
        return {"object": "list", "data": await call(repo.list_bindings, me.account_id)}

    @router.put("/bindings/{provider}")
    async def put_binding(provider: str, request: Request, me: Principal = Me) -> dict[str, Any]:
        body = parse_model(PutBinding, await _json_body(request))
        check_provider(provider)
        out = await call(repo.put_binding, me.account_id, provider, body.api_key, body.key_ids, actor=me.actor)
        await changed("account", me.account_id)
        return out

    @router.delete("/bindings/{provider}")
    async def delete_binding(provider: str, me: Principal = Me) -> dict[str, Any]:
        out = await call(repo.delete_binding, me.account_id, provider, actor=me.actor)
        await changed("account", me.account_id)
        return dict(out, deleted=True)

    # ------------------------------------------------------------ usage, logs, risk, audit

    @router.get("/usage")
    async def usage(me: Principal = Me) -> dict[str, Any]:
        acc = await call(repo.get_account, me.account_id)
        out: dict[str, Any] = {"object": "usage", "account_id": me.account_id,
                               "plan": acc["plan"] if acc else None, "quota": {},
                               "tokens_today": await call(repo.token_totals, me.account_id, start_of_utc_day())}
        try:
            apply_live(out, await live_usage(me.account_id))  # the ledger's totals come with it
        except Exception:
            log.exception("usage(%s) failed", me.account_id)
            out["quota"] = {"error": "live counters unavailable"}
            out["credits"] = credit_view(await call(repo.ledger_totals, me.account_id))
        return out

    @router.get("/logs")
    async def logs(request: Request, me: Principal = Me) -> dict[str, Any]:
        q = request.query_params
        limit = _int_query(request, "limit", 50)
        rows = await call(
            repo.query_logs, me.account_id, limit=limit, before=q.get("before") or None,
            status=q.get("status") or None, model=q.get("model") or None,
            key_id=q.get("key_id") or None, since=q.get("since") or None,
        )
        return {"object": "list", "data": rows,
                "next_before": rows[-1]["request_id"] if len(rows) == limit else None}

    @router.get("/risk-events")
    async def risk_events(request: Request, me: Principal = Me) -> dict[str, Any]:
        limit = _int_query(request, "limit", 50)
        return {"object": "list", "data": await call(repo.list_risk_events, me.account_id, limit)}

    @router.get("/audit")
    async def audit(request: Request, me: Principal = Me) -> dict[str, Any]:
        limit = _int_query(request, "limit", 50)
        return {"object": "list", "data": await call(repo.list_audit, limit, account_id=me.account_id)}

    @router.get("/traffic")
    async def traffic(request: Request, me: Principal = Me) -> dict[str, Any]:
        minutes = _int_query(request, "minutes", 60, hi=MAX_TRAFFIC_MINUTES)
        return await call(traffic_buckets, repo.engine, me.account_id, minutes)

    return router
