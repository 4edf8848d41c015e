"""A model the catalog prices not at all, billed in process from the price database (genai-prices):
the reservation at admission and the charge at settlement both use the database's price per class,
with the catalog's markup."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers import write_catalog
from tests.integration.conftest import PLAN
from tests.integration.gateway import OP, account, chat, code, new_key
from trex_serve.catalog import load_catalog
from trex_serve.local.standalone import standalone_gateway
from trex_serve.settings import Settings

WIRE = Path(__file__).parents[2] / "fixtures" / "wire"


@pytest.fixture
async def gw(mocks, tmp_path, database_url, redis_url, key_prefix):
    for m in mocks.values():
        m.reset()
    path = write_catalog(tmp_path / "catalog.yaml", mocks, extra=PLAN)
    data = yaml.safe_load(path.read_text())
    data["price_markup_pct"] = 10
    # No price at all; "claude" is no database provider, so the model is found by its name alone.
    data["models"].append({"id": "db-claude", "tier": "premium",
                           "candidates": [{"provider": "claude", "model": "claude-sonnet-4-5"}]})
    path.write_text(yaml.safe_dump(data))
    settings = Settings(catalog_path="", database_url=database_url, redis_url=redis_url, admin_token="op",
                        secret_key="test-secret", auth_failures_per_minute=5)
    async with standalone_gateway(settings, load_catalog(str(path)), counters_prefix=key_prefix) as gateway:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app), base_url="http://gw") as client:
            client.runtime = gateway.runtime
            client.mocks = mocks
            yield client


async def test_a_model_priced_only_by_the_database_reserves_at_its_database_prices(gw):
    # 0.01 credits cannot cover 4,096 output tokens at $15 + 10% per 1M (67,584 micro-credits)
    acc = await account(gw, credits=0.01)
    key = await new_key(gw, acc)
    r = await chat(gw, key["key"], model="db-claude")
    assert r.status_code == 402 and code(r) == "insufficient_credits"
    assert gw.mocks["alpha"].stats().get("requests", 0) == 0


async def test_a_model_priced_only_by_the_database_is_charged_its_prices_plus_the_markup(gw):
    gw.mocks["alpha"].control(usage=json.loads((WIRE / "anthropic_message_cached.json").read_text())["usage"])
    acc = await account(gw, credits=5)
    key = await new_key(gw, acc)
    r = await chat(gw, key["key"], model="db-claude")
    assert r.status_code == 200 and r.headers["x-trex-billing"] == "credits"
    await gw.runtime.ledger.flush_once()
    ledger = (await gw.get(f"/admin/v1/accounts/{acc['id']}/ledger", headers=OP)).json()["data"]
    # Anthropic's sheet (docs/BILLING.md's example): 1,200 x 3 + 30,000 x 0.30 + 1,500 x 3.75 + 500 x 6
    # + 500 x 15 = 28,725, plus 10%: 31,597.5, rounded up.
    assert [e["amount_micro"] for e in ledger if e["kind"] == "charge"] == [-31_598]
