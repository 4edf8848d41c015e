"""`trex-serve prices`: the price each token class of each model is billed at, per provider that can
serve it, and where each number came from (the catalog, the price database with the markup, or a
fallback). Reads the catalog of TREX_CATALOG (or --catalog); changes nothing."""

from __future__ import annotations

import argparse
import os
from decimal import Decimal

from trex_serve.billing.prices import CLASSES, price_book
from trex_serve.catalog import load_catalog
from trex_serve.settings import DEFAULT_CATALOG

_HEAD = {"input": "input", "output": "output", "cache_read": "cache read", "cache_write": "cache write 5m",
         "cache_write_1h": "cache write 1h", "reasoning": "reasoning"}


def _num(value: Decimal) -> str:
    text = f"{value.normalize():f}"
    return text if len(text) <= 10 else f"{float(value):.6g}"


def render(catalog_path: str, plan: str | None = None) -> str:
    catalog = load_catalog(catalog_path)
    if plan is not None and catalog.plan(plan) is None:
        raise SystemExit(f"no plan {plan!r} in {catalog_path}")
    book = price_book(catalog)
    lines = [f"Compute Credits per 1M tokens ({catalog_path}"
             + (f", plan {plan}" if plan else "") + f"; database markup {book.markup_pct(plan):g}%)"]
    unknown: list[str] = []
    for model in catalog.models:
        lines.append("")
        lines.append(f"{model.id} ({model.tier})")
        for cand in model.candidates:
            lines.append(f"  via {cand.provider} / {cand.model}")
            quotes = book.explain(model, cand.provider, cand.model, plan)
            for name in CLASSES:
                q = quotes[name]
                lines.append(f"    {_HEAD[name]:<15} {_num(q.price):>10}   {q.source}")
            missing = [name for name in ("input", "output") if quotes[name].source == "none"]
            if missing:
                unknown.append(f"  {model.id} via {cand.provider} / {cand.model}: {', '.join(missing)}")
    if unknown:
        # A zero price is almost always a catalog mistake (a typo in the upstream model's name, a
        # model too new for the database): say so apart, where it cannot be missed.
        lines += ["", "Unknown prices (neither the catalog nor the price database has them; billed at 0):",
                  *unknown]
    return "\n".join(lines)


def cmd_prices(args: argparse.Namespace) -> int:
    path = args.catalog or os.environ.get("TREX_CATALOG")
    if not path:
        path = str(DEFAULT_CATALOG)
    print(render(path, args.plan))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    prices = sub.add_parser("prices", help="the price per token class each model is billed at, and its source")
    prices.add_argument("--catalog", help="catalog YAML (default: TREX_CATALOG, else the demo catalog)")
    prices.add_argument("--plan", help="apply this plan's markup on database prices")
    prices.set_defaults(fn=cmd_prices)
