"""Where each token class's price comes from: the catalog, the price database (genai-prices) with the
operator's markup, or a fallback; and the CLI that shows it."""

from __future__ import annotations

from decimal import Decimal

import yaml

from trex_serve.billing.prices import PriceBook, PriceDatabase
from trex_serve.billing.pricing import charge_micro
from trex_serve.catalog import parse_catalog
from trex_serve.local.cli_prices import render
from trex_serve.providers.usage import Usage


def catalog(markup: float = 0.0, **price):
    return parse_catalog({
        "price_markup_pct": markup,
        "providers": [{"name": "anthropic", "base_url": "http://a", "format": "anthropic"},
                      {"name": "corp-claude", "base_url": "http://c", "format": "anthropic",
                       "prices_provider": "anthropic"},
                      {"name": "local", "base_url": "http://l", "auth": "none"}],
        "models": [
            {"id": "sonnet", "price": price, "candidates": [{"provider": "anthropic", "model": "claude-sonnet-4-5"},
                                                            {"provider": "corp-claude", "model": "claude-sonnet-4-5"}]},
            {"id": "house", "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
             "candidates": [{"provider": "local", "model": "house-model-7b"}]},
            {"id": "unpriced", "candidates": [{"provider": "local", "model": "house-model-7b"}]},
        ],
        "plans": [{"name": "free"}, {"name": "resale", "price_markup_pct": 20}],
    })


def quotes(cat, model="sonnet", provider="anthropic", upstream="claude-sonnet-4-5", plan=None):
    book = PriceBook(cat)
    return book.explain(cat.model(model), provider, upstream, plan)


def test_every_class_from_the_price_database_when_the_catalog_gives_none():
    q = quotes(catalog())
    assert {k: v.price for k, v in q.items()} == {
        "input": Decimal(3), "output": Decimal(15), "cache_read": Decimal("0.3"), "cache_write": Decimal("3.75"),
        "cache_write_1h": Decimal(6), "reasoning": Decimal(15)}
    assert q["cache_read"].source == "database anthropic/claude-sonnet-4-5"
    assert q["reasoning"].source == "output price"


def test_a_catalog_price_wins_and_the_markup_touches_database_prices_only():
    q = quotes(catalog(markup=10, input_per_mtok=2.0, cache_read_per_mtok=0.25))
    assert (q["input"].price, q["input"].source) == (Decimal("2.0"), "catalog")
    assert (q["cache_read"].price, q["cache_read"].source) == (Decimal("0.25"), "catalog")
    assert q["output"].price == Decimal("16.5") and q["output"].source == "database anthropic/claude-sonnet-4-5 +10%"
    assert q["cache_write"].price == Decimal("4.125")


def test_a_plan_markup_overrides_the_catalog_wide_one():
    cat = catalog(markup=10)
    assert quotes(cat, plan="resale")["input"].price == Decimal("3.6")
    assert quotes(cat, plan="free")["input"].price == Decimal("3.3")


def test_prices_provider_names_the_database_provider():
    q = quotes(catalog(), provider="corp-claude")
    assert q["cache_write_1h"].price == Decimal(6) and "anthropic/" in q["cache_write_1h"].source


def test_a_model_the_database_does_not_know_bills_cache_classes_at_the_input_price():
    q = quotes(catalog(), model="house", provider="local", upstream="house-model-7b")
    assert [(q[n].price, q[n].source) for n in ("cache_read", "cache_write", "cache_write_1h", "reasoning")] == [
        (Decimal("1.0"), "input price"), (Decimal("1.0"), "input price"), (Decimal("1.0"), "input price"),
        (Decimal("2.0"), "output price")]
    unknown = quotes(catalog(), model="unpriced", provider="local", upstream="house-model-7b")
    assert (unknown["input"].price, unknown["input"].source) == (Decimal(0), "none")


def test_without_the_database_the_catalog_and_fallbacks_still_price():
    db = PriceDatabase()
    db._failed = True  # as when genai-prices cannot be imported
    cat = catalog(input_per_mtok=3.0, output_per_mtok=15.0)
    prices = PriceBook(cat, db).for_target(cat.model("sonnet"), "anthropic", "claude-sonnet-4-5", None)
    assert prices.cache_read == Decimal("3.0") and prices.output == Decimal("15.0")


def test_database_prices_bill_an_anthropic_cached_call_like_the_price_sheet():
    cat = catalog()
    prices = PriceBook(cat).for_target(cat.model("sonnet"), "anthropic", "claude-sonnet-4-5", None)
    usage = Usage(input_tokens=1200, output_tokens=500, cache_read_tokens=30000, cache_write_tokens=1500,
                  cache_write_1h_tokens=500)
    assert charge_micro(usage, prices) == 1200 * 3 + 3000 * 3 + 5625 + 500 * 6 + 500 * 15


def test_the_cli_shows_each_class_with_its_source(tmp_path):
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(catalog(input_per_mtok=2.0).model_dump(mode="json", exclude_none=True)))
    out = render(str(path), "resale")
    assert "sonnet (standard)" in out and "via corp-claude / claude-sonnet-4-5" in out
    assert "catalog" in out and "database anthropic/claude-sonnet-4-5 +20%" in out and "input price" in out
    assert "none" in out  # the unpriced house model
