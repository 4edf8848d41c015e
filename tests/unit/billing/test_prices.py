"""Where each token class's price comes from: the catalog, the price database (genai-prices) with the
operator's markup, or a fallback; and the CLI that shows it."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal

import pytest
import yaml

from trex_serve.billing.prices import PriceBook, PriceDatabase, target_cost
from trex_serve.billing.pricing import ClassPrices, charge_micro
from trex_serve.catalog import load_catalog, parse_catalog
from trex_serve.local import cli
from trex_serve.local.cli_prices import render
from trex_serve.providers.usage import Usage
from trex_serve.routing.resolve import Target
from trex_serve.settings import DEFAULT_CATALOG


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


# ---- each class against the providers' price sheets, through the price book ----------------------

SHEET = parse_catalog({
    "providers": [{"name": "anthropic", "base_url": "http://a", "format": "anthropic"},
                  {"name": "openai", "base_url": "http://o"}],
    "models": [{"id": "sonnet", "candidates": [{"provider": "anthropic", "model": "claude-sonnet-4-5"}]},
               {"id": "mini", "candidates": [{"provider": "openai", "model": "gpt-4o-mini"}]},
               {"id": "o3-mini", "candidates": [{"provider": "openai", "model": "o3-mini"}]},
               {"id": "o3-mini-r", "price": {"reasoning_per_mtok": 8.0},
                "candidates": [{"provider": "openai", "model": "o3-mini"}]}],
})


def charge(model: str, usage: Usage, cat=SHEET) -> int:
    target = cat.model(model).candidates[0]
    return charge_micro(usage, PriceBook(cat).for_target(cat.model(model), target.provider, target.model, None))


@pytest.mark.parametrize(("usage", "expected"), [
    (Usage(input_tokens=10_000), 10_000 * 3),               # $3 / MTok input
    (Usage(cache_read_tokens=10_000), 10_000 * 3 // 10),    # $0.30 cache read
    (Usage(cache_write_tokens=10_000), 37_500),             # $3.75 5-minute cache write
    (Usage(cache_write_1h_tokens=10_000), 10_000 * 6),      # $6 1-hour cache write
    (Usage(output_tokens=10_000), 10_000 * 15),             # $15 output
    (Usage(output_tokens=10_000, reasoning_tokens=10_000), 10_000 * 15),  # thinking is output
])
def test_each_anthropic_class_is_billed_at_its_price_sheet_price(usage, expected):
    assert charge("sonnet", usage) == expected


def test_a_cached_gpt_4o_mini_call_is_billed_at_openai_s_cached_input_price():
    # $0.15 input, $0.075 cached input, $0.60 output per MTok: ceil(86 x 0.15 + 1,920 x 0.075 + 300 x 0.6)
    usage = Usage.from_openai({"prompt_tokens": 2006, "completion_tokens": 300,
                               "prompt_tokens_details": {"cached_tokens": 1920}})
    assert charge("mini", usage) == 337


def test_reasoning_is_billed_at_the_output_price_unless_the_catalog_prices_it_apart():
    # o3-mini: $1.10 input, $4.40 output per MTok; 1,500 of the 2,000 output tokens were reasoning
    usage = Usage(input_tokens=1000, output_tokens=2000, reasoning_tokens=1500)
    assert charge("o3-mini", usage) == 1000 * 1.1 + 2000 * 4.4
    assert charge("o3-mini-r", usage) == 1000 * 1.1 + 500 * 4.4 + 1500 * 8


# ---- the demo catalog, ranking, warm-up and the command -------------------------------------------

def test_the_demo_catalog_loads_and_prices_every_route():
    cat = load_catalog(str(DEFAULT_CATALOG))
    book = PriceBook(cat)
    for model in cat.models:
        for cand in model.candidates:
            q = book.explain(model, cand.provider, cand.model, "free")
            assert q["input"].source == q["output"].source == "catalog"
            if model.price.cache_read_per_mtok is not None:  # claude-sonnet: every class in the catalog
                assert q["cache_read"].source == "catalog"
                continue
            # mock-openai is no database provider: gpt-4o* are found by their name alone
            assert q["cache_read"].source == f"database openai/{cand.model}"
    mini = cat.model("gpt-4o-mini")
    assert book.for_target(mini, "mock-backup", "gpt-4o-mini", None) == ClassPrices(
        input=Decimal("0.15"), output=Decimal("0.6"), cache_read=Decimal("0.075"), cache_write=Decimal("0.15"),
        cache_write_1h=Decimal("0.15"), reasoning=Decimal("0.6"))


def test_smart_auto_ranks_a_model_priced_only_by_the_database_at_its_database_price():
    cost = target_cost(SHEET)
    assert cost(Target("anthropic", "claude-sonnet-4-5", SHEET.model("sonnet"))) == 18.0
    assert cost(Target("openai", "gpt-4o-mini", SHEET.model("mini"))) == 0.75


class CountingDatabase(PriceDatabase):
    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0

    def lookup(self, providers, model):
        self.lookups += 1
        return super().lookup(providers, model)


def test_warm_prices_every_route_and_plan_so_requests_never_look_up():
    cat, db = catalog(), CountingDatabase()
    book = PriceBook(cat, db)
    book.warm()
    done = db.lookups
    assert done > 0
    for model in cat.models:
        for cand in model.candidates:
            for plan in (None, "free", "resale"):
                book.for_target(model, cand.provider, cand.model, plan)
    assert db.lookups == done


def test_the_command_reads_trex_catalog_and_says_which_prices_nobody_knows(tmp_path, monkeypatch, capsys):
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(catalog().model_dump(mode="json", exclude_none=True)))
    monkeypatch.setenv("TREX_CATALOG", str(path))
    assert cli.main(["prices"]) == 0
    out = capsys.readouterr().out
    assert f"({path}; database markup 0%)" in out
    assert "    cache write 1h           6   database anthropic/claude-sonnet-4-5" in out
    unknown = out.split("Unknown prices")[1]
    assert "billed at 0" in unknown and "\n  unpriced via local / house-model-7b: input, output" in unknown
    assert "\n  house via" not in unknown and "sonnet via" not in unknown


def test_the_command_defaults_to_the_demo_catalog(monkeypatch, capsys):
    monkeypatch.delenv("TREX_CATALOG", raising=False)
    assert cli.main(["prices", "--plan", "pro"]) == 0
    out = capsys.readouterr().out
    assert "plan pro" in out and "gpt-4o (premium)" in out and "via mock-backup / gpt-4o" in out
    assert "    cache read            1.25   database openai/gpt-4o" in out
    assert "Unknown prices" not in out


def test_the_load_test_expects_the_charge_at_the_gateway_s_class_prices(tmp_path):
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(SHEET.model_dump(mode="json", exclude_none=True)))
    # loadtests/harness.py (Locust) patches the whole process with gevent on import: run it in its own.
    code = ("import sys; from loadtests.harness import Catalog; print(Catalog(sys.argv[1]).cost_micro('mini', "
            "{'prompt_tokens': 2006, 'completion_tokens': 300, 'prompt_tokens_details': {'cached_tokens': 1920}}, "
            "'openai', 'gpt-4o-mini', None))")
    done = subprocess.run([sys.executable, "-c", code, str(path)], cwd=DEFAULT_CATALOG.parents[1],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "337"  # the price sheet's, as in the gpt-4o-mini test above
