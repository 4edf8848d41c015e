"""Small helpers for driving the in-process gateway of tests/integration/conftest.py."""

from __future__ import annotations

OP = {"Authorization": "Bearer op"}


async def account(gw, plan="free", credits=None, **patch):
    acc = (await gw.post("/admin/v1/accounts", json={"name": "t", "plan": plan}, headers=OP)).json()
    if credits:
        await gw.post(f"/admin/v1/accounts/{acc['id']}/credits", json={"amount": credits, "reason": "t"}, headers=OP)
    if patch:
        r = await gw.patch(f"/admin/v1/accounts/{acc['id']}", json=patch, headers=OP)
        assert r.status_code == 200, r.text
    return acc


async def new_key(gw, acc, **body):
    r = await gw.post(f"/admin/v1/accounts/{acc['id']}/keys", json=body, headers=OP)
    assert r.status_code == 201, r.text
    return r.json()


async def chat(gw, key, model="gpt-4o-mini", headers=None, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], **extra}
    return await gw.post("/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {key}", **(headers or {})})


def code(r):
    return r.json()["error"]["code"]


