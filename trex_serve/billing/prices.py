"""The price of each token class a request is billed at, per model and the provider that served it,
and where each number came from (docs/BILLING.md).

For each class: the catalog's own price wins (the operator's final price); else the price database
(PyPI ``genai-prices``: providers' price sheets, cache prices included) for the provider model that
served the request, with the operator's markup; else the input price (cache classes) or the output
price (reasoning); an input or output price nobody knows is 0 (``trex-serve prices`` says so)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any

from trex_serve.billing.pricing import ClassPrices, _dec
from trex_serve.catalog import Catalog, Model

log = logging.getLogger("trex.prices")

CLASSES = ("input", "output", "cache_read", "cache_write", "cache_write_1h", "reasoning")
_CATALOG_FIELD = {"input": "input_per_mtok", "output": "output_per_mtok", "cache_read": "cache_read_per_mtok",
                  "cache_write": "cache_write_per_mtok", "cache_write_1h": "cache_write_1h_per_mtok",
                  "reasoning": "reasoning_per_mtok"}
# genai-prices' ModelPrice fields (USD per 1M tokens; 1 credit = 1 USD here unless the markup says more).
_DATABASE_FIELD = {"input": "input_mtok", "output": "output_mtok", "cache_read": "cache_read_mtok",
                   "cache_write": "cache_write_mtok", "cache_write_1h": "cache_write_1h_mtok"}
_FALLBACK = {"cache_read": "input", "cache_write": "input", "cache_write_1h": "input", "reasoning": "output"}


@dataclass(frozen=True, slots=True)
class Quote:
    """One class's price and where it came from."""

    price: Decimal
    source: str


class PriceDatabase:
    """genai-prices, loaded once on first use. A failure to load or to find a model answers None:
    the price then comes from the next source, and a request never fails for it."""

    def __init__(self) -> None:
        self._snapshot: Any = None
        self._failed = False

    def _load(self) -> Any:
        if self._snapshot is None and not self._failed:
            try:
                from genai_prices import data_snapshot

                self._snapshot = data_snapshot.get_snapshot()
            except Exception:  # not installed, or its data unreadable: catalog prices only
                self._failed = True
                log.warning("price database (genai-prices) unavailable: catalog prices only", exc_info=True)
        return self._snapshot

    def lookup(self, providers: tuple[str | None, ...], model: str) -> tuple[str, dict[str, Decimal]] | None:
        """(``provider/model`` as the database names it, prices per class) for the first provider id
        that knows the model (None: by the model's name alone)."""
        snapshot = self._load()
        if snapshot is None or not model:
            return None
        for provider_id in providers:
            try:
                provider, info = snapshot.find_provider_model(model, None, provider_id, None)
                prices = info.get_prices(datetime.now(UTC))
            except Exception:  # LookupError for an unknown pair; anything else is the data's fault
                continue
            out = {}
            for name, field in _DATABASE_FIELD.items():
                value = getattr(prices, field, None)
                # Tiered prices (long prompts cost more at some providers) bill at the base tier.
                value = getattr(value, "base", value)
                if value is not None:
                    out[name] = Decimal(str(value))
            if out:
                return f"{provider.id}/{info.id}", out
        return None


_DATABASE = PriceDatabase()


class PriceBook:
    def __init__(self, catalog: Catalog, database: PriceDatabase | None = None) -> None:
        self.catalog = catalog
        self.database = database or _DATABASE
        # Keyed by the model's id: catalog models are pydantic objects, not hashable.
        self._quotes = lru_cache(maxsize=4096)(self._resolve)

    def for_target(self, model: Model, provider: str | None, upstream_model: str | None,
                   plan: str | None) -> ClassPrices:
        return self._quotes(model.id, provider, upstream_model, plan)[0]

    def explain(self, model: Model, provider: str | None, upstream_model: str | None,
                plan: str | None = None) -> dict[str, Quote]:
        """Each class's price and its source (``trex-serve prices``)."""
        return self._quotes(model.id, provider, upstream_model, plan)[1]

    def warm(self) -> int:
        """Price every route of the catalog for every plan now, so no request pays for loading the
        database (~0.15 s, blocking) or a lookup. Call it at startup, off the event loop. Returns
        how many (route, plan) pairs were priced."""
        plans: list[str | None] = [None, *(p.name for p in self.catalog.plans)]
        n = 0
        for model in self.catalog.models:
            for cand in model.candidates:
                for plan in plans:
                    self._quotes(model.id, cand.provider, cand.model, plan)
                    n += 1
        return n

    def markup_pct(self, plan: str | None) -> float:
        p = self.catalog.plan(plan) if plan else None
        if p is not None and p.price_markup_pct is not None:
            return p.price_markup_pct
        return self.catalog.price_markup_pct

    def _resolve(self, model_id: str, provider: str | None, upstream_model: str | None,
                 plan: str | None) -> tuple[ClassPrices, dict[str, Quote]]:
        model = self.catalog.model(model_id)
        if model is None:
            raise KeyError(model_id)
        quotes: dict[str, Quote] = {}
        for name in CLASSES:
            value = getattr(model.price, _CATALOG_FIELD[name])
            if value is not None:
                quotes[name] = Quote(_dec(value), "catalog")
        missing = [n for n in CLASSES if n not in quotes]
        if missing and any(n in _DATABASE_FIELD for n in missing):
            found = self.database.lookup(self._provider_ids(provider), upstream_model or model.id)
            if found is not None:
                where, prices = found
                pct = self.markup_pct(plan)
                factor = 1 + _dec(pct) / 100
                label = f"database {where}" + (f" +{pct:g}%" if pct else "")
                for name in missing:
                    if name in prices:
                        quotes[name] = Quote(prices[name] * factor, label)
        for name in ("input", "output"):
            quotes.setdefault(name, Quote(Decimal(0), "none"))
        for name in CLASSES:
            if name not in quotes:
                base = quotes[_FALLBACK[name]]
                quotes[name] = Quote(base.price, f"{_FALLBACK[name]} price")
        prices = ClassPrices(**{name: quotes[name].price for name in CLASSES})
        return prices, {name: quotes[name] for name in CLASSES}

    def _provider_ids(self, provider: str | None) -> tuple[str | None, ...]:
        spec = self.catalog.provider(provider) if provider else None
        if spec is not None and spec.prices_provider:
            return (spec.prices_provider,)
        return (provider, None) if provider else (None,)


def target_cost(catalog: Catalog) -> Callable[[Any], float]:
    """Credits per 1M input + output tokens of a routing target (Smart Auto's cost tie-break)."""
    book = price_book(catalog)

    def cost(target: Any) -> float:
        p = book.for_target(target.model, target.provider, target.upstream_model, None)
        return float(p.input + p.output)

    return cost


def price_book(catalog: Catalog) -> PriceBook:
    """The catalog's one price book (its lookups are cached with it)."""
    book = getattr(catalog, "_price_book", None)
    if book is None:
        book = catalog._price_book = PriceBook(catalog)  # type: ignore[attr-defined]
    return book
