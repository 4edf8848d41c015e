"""Operator view of the managed key pools: ``GET /admin/v1/upstream-keys`` lists every key with its
live state (never its secret), ``POST /admin/v1/upstream-keys/{provider}/{key_id}/reinstate`` puts a
cooling or out key back at once (audited)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends

from trex_serve.errors import NotFound
from trex_serve.routing.managed_key_caller import KeyedCaller
from trex_serve.web.admin_api import operator_guard

Audit = Callable[[str, str, dict[str, Any]], Awaitable[None]]  # action, target id, detail


def build_upstream_keys_router(admin_token: str, caller: Callable[[], KeyedCaller | None],
                               audit: Audit) -> APIRouter:
    router = APIRouter(prefix="/admin/v1/upstream-keys", dependencies=[Depends(operator_guard(admin_token))],
                       tags=["admin"])

    def keyed() -> KeyedCaller:
        current = caller()
        if current is None:
            raise NotFound("This gateway has no managed key pools.")
        return current

    @router.get("")
    async def list_keys() -> dict[str, Any]:
        current = caller()
        if current is None:
            return {"object": "list", "data": []}
        states = await current.states()
        rows = []
        for provider in current.catalog.providers:
            ready = {k.key_id for k in current.ready(provider.name)}
            for key in provider.keys:
                st = states.get((provider.name, key.key_id))
                rows.append({"provider": provider.name, "id": key.key_id, "env": key.env, "weight": key.weight,
                             "rpm": key.rpm, "tpm": key.tpm, "configured": key.key_id in ready,
                             "state": st.state if st else "active",
                             "seconds_left": round(st.seconds_left, 1) if st else 0.0,
                             "rpm_used": st.rpm_used if st else 0})
        return {"object": "list", "data": rows}

    @router.post("/{provider}/{key_id}/reinstate")
    async def reinstate(provider: str, key_id: str) -> dict[str, Any]:
        current = keyed()
        spec = current.catalog.provider(provider)
        if spec is None or spec.upstream_key(key_id) is None:
            raise NotFound(f"No managed key {key_id!r} of provider {provider!r}", param="key_id")
        cleared = await current.store.reinstate(provider, key_id)
        await audit("upstream_key.reinstate", f"{provider}/{key_id}", {"was_cooling_or_out": cleared})
        return {"provider": provider, "id": key_id, "state": "active", "was_cooling_or_out": cleared}

    return router
