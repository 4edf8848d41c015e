"""Resolve a requested model into an ordered list of upstream targets, using the catalog, the
request's routing extension and the latest health table published by the Router."""

from __future__ import annotations

import time
from dataclasses import dataclass

from trex_serve.catalog import Catalog, Model
from trex_serve.errors import InvalidRequest, ModelNotFound, UpstreamUnavailable
from trex_serve.health import TargetHealth
from trex_serve.schemas import TrexRouting

SMART_AUTO = "smart-auto"


@dataclass(frozen=True)
class Target:
    provider: str
    upstream_model: str
    model: Model  # the public catalog entry: tier, prices, context window

    @property
    def key(self) -> tuple[str, str]:
        return (self.provider, self.upstream_model)


@dataclass(frozen=True)
class Resolution:
    public_model: str
    targets: tuple[Target, ...]
    pinned: bool
    smart_auto: bool

    @property
    def primary(self) -> Model:
        return self.targets[0].model


@dataclass
class RoutingTable:
    """The Router's latest view: health per provider×model. Version increases on each publish."""

    health: dict[tuple[str, str], TargetHealth]
    version: int = 0

    def get(self, key: tuple[str, str]) -> TargetHealth | None:
        return self.health.get(key)


def _chain(model: Model) -> list[Target]:
    return [Target(c.provider, c.model, model) for c in model.candidates]


def _qualified(catalog: Catalog, name: str) -> list[Target] | None:
    provider, sep, rest = name.partition("/")
    if not sep or catalog.provider(provider) is None or not rest:
        return None
    for model in catalog.models:
        for cand in model.candidates:
            if cand.provider == provider and (cand.model == rest or model.id == rest):
                return [Target(provider, cand.model, model)]
    return []


def _unknown_fallback(catalog: Catalog, provider: str, model: str) -> str:
    """Why a fallback pair is refused, naming what is allowed. Only catalog routes are: a request
    is billed at the catalog's prices, and a pair the catalog does not list has none."""
    head = f"Fallback {provider}/{model} is not a route in the catalog (requests are billed at catalog prices)."
    if catalog.provider(provider) is None:
        names = ", ".join(p.name for p in catalog.providers)
        return f"{head} Unknown provider {provider!r}; providers: {names}."
    pairs = [f"{provider}/{c.model}" + ("" if c.model == m.id else f" (model {m.id})")
             for m in catalog.models for c in m.candidates if c.provider == provider]
    if not pairs:
        return f"{head} Provider {provider!r} serves no model in the catalog."
    return f"{head} Routes of {provider!r}: {', '.join(pairs)}."


def resolve(catalog: Catalog, requested: str, routing: TrexRouting | None) -> Resolution:
    """The candidate chain for a request, before health is applied. Raises ModelNotFound."""
    pinned = False
    smart = requested == SMART_AUTO
    if smart:
        targets = [t for mid in catalog.smart_auto for t in _chain(catalog.model(mid))]  # type: ignore[arg-type]
        public = SMART_AUTO
    elif (model := catalog.model(requested)) is not None:
        targets, public = _chain(model), model.id
    else:
        qualified = _qualified(catalog, requested)
        if not qualified:
            raise ModelNotFound(f"The model '{requested}' does not exist or you do not have access to it.",
                                param="model")
        targets, public, pinned = qualified, qualified[0].model.id, True
    if not targets:
        raise ModelNotFound(f"No route is configured for '{requested}'.", param="model")
    if routing is not None and routing.provider:
        targets = [t for t in targets if t.provider == routing.provider]
        if not targets:
            raise ModelNotFound(
                f"The model '{requested}' is not served by provider '{routing.provider}'.",
                param="trex.routing.provider",
            )
        pinned = True
    if routing is not None and routing.fallbacks and not pinned:
        extra = []
        for i, fb in enumerate(routing.fallbacks):
            found = _qualified(catalog, f"{fb.provider}/{fb.model}")
            if not found:
                raise InvalidRequest(_unknown_fallback(catalog, fb.provider, fb.model),
                                     param=f"trex.routing.fallbacks[{i}]")
            extra.extend(found)
        # Explicit fallbacks come right after the primary, then the rest of the catalog chain.
        merged = [targets[0], *extra, *targets[1:]]
        seen: set[tuple[str, str]] = set()
        targets = [t for t in merged if not (t.key in seen or seen.add(t.key))]
    if routing is not None and not routing.allow_fallbacks:
        targets = targets[:1]
    return Resolution(public, tuple(targets), pinned, smart)


class Planner:
    """Orders a resolution's targets by health. Lives in each ingress replica; holds only the
    latest table and the local half-open probe clock."""

    def __init__(self, probe_interval_s: float = 1.0) -> None:
        self.table = RoutingTable({})
        self.probe_interval_s = probe_interval_s
        self._last_probe: dict[tuple[str, str], float] = {}

    def update(self, table: RoutingTable) -> None:
        if table.version >= self.table.version:
            self.table = table

    def order(self, resolution: Resolution, now: float | None = None) -> list[Target]:
        now = time.time() if now is None else now
        healthy: list[Target] = []
        probes: list[Target] = []
        for target in resolution.targets:
            h = self.table.get(target.key)
            # The catalog's order is the user's preference: a closed circuit keeps its place, and
            # a failing target is skipped once its circuit opens, not demoted on one error.
            if h is None or h.state == "closed":
                healthy.append(target)
            elif h.state == "half_open" or (h.state == "open" and now >= h.open_until):
                # One request per interval per replica probes a recovering target first.
                if now - self._last_probe.get(target.key, 0.0) >= self.probe_interval_s:
                    self._last_probe[target.key] = now
                    probes.append(target)
        if resolution.smart_auto:
            def rank(t: Target) -> tuple[float, float]:
                h = self.table.get(t.key)
                price = t.model.price.input_per_mtok + t.model.price.output_per_mtok
                return (-(h.score if h else 1.0), price)
            healthy.sort(key=rank)
        ordered = probes + healthy
        if not ordered:
            raise UpstreamUnavailable(
                "Every provider for this model is temporarily unavailable (circuit open).",
                status=503,
                headers={"Retry-After": str(self._retry_after(resolution, now))},
            )
        return ordered

    def _retry_after(self, resolution: Resolution, now: float) -> int:
        waits = [h.open_until - now for t in resolution.targets if (h := self.table.get(t.key))]
        return max(1, int(min(waits, default=1.0)) + 1)
