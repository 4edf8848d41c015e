"""Resolve a requested model into an ordered list of upstream targets, using the catalog, the
request's routing extension and the latest health table published by the Router."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from trex_serve.catalog import Catalog, Model
from trex_serve.errors import InvalidRequest, ModelNotFound, UpstreamUnavailable
from trex_serve.routing.health import HealthPolicy, TargetHealth
from trex_serve.routing.request_routing import TrexRouting

SMART_AUTO = "smart-auto"


@dataclass(frozen=True)
class Target:
    provider: str
    upstream_model: str
    model: Model  # the public catalog entry: tier, prices, context window
    thinking: str | None = None  # the form of Anthropic thinking this upstream model takes (Candidate)

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
    """The Router's latest view: health per provider×model. Version increases on each publish;
    ``epoch`` names the Router replica's lifetime (a restarted Router counts from 0 again) and
    ``changes`` counts the reports that opened or closed a circuit (see HealthBoard)."""

    health: dict[tuple[str, str], TargetHealth]
    version: int = 0
    epoch: str = ""
    changes: int = 0

    def get(self, key: tuple[str, str]) -> TargetHealth | None:
        return self.health.get(key)


def _chain(model: Model) -> list[Target]:
    return [Target(c.provider, c.model, model, c.thinking) for c in model.candidates]


def _qualified(catalog: Catalog, name: str) -> list[Target] | None:
    provider, sep, rest = name.partition("/")
    if not sep or catalog.provider(provider) is None or not rest:
        return None
    for model in catalog.models:
        for cand in model.candidates:
            if cand.provider == provider and (cand.model == rest or model.id == rest):
                return [Target(provider, cand.model, model, cand.thinking)]
    return []


def _catalog_cost(target: Target) -> float:
    price = target.model.price
    return (price.input_per_mtok or 0.0) + (price.output_per_mtok or 0.0)


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
    if requested != SMART_AUTO and catalog.model(requested) is None:
        requested = catalog.alias(requested) or requested
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
    """Orders a resolution's targets by health. Lives in each ingress replica; holds the latest table,
    the local probe clock, and the recoveries this replica saw itself before the table shows them.

    While some candidate of a model is closed, an open target waits out its cool-down and is then
    probed once per ``probe_interval_s``. When no candidate is usable the model would be dark for as
    long as the longest cool-down (up to ``max_cooldown_s``), so every target is probed once per
    ``panic_probe_interval_s`` instead, cool-down or not (Envoy's panic threshold, made bounded):
    a recovery is found within that interval, and a provider still down sees at most one request
    per interval per ingress replica. Only an upstream's own Retry-After holds off these probes."""

    def __init__(self, policy: HealthPolicy | None = None,
                 cost: Callable[[Target], float] | None = None) -> None:
        p = policy or HealthPolicy()
        # Smart Auto's tie-break between equally healthy targets: credits per 1M input + output
        # tokens (billing.prices.target_cost, which knows the price database; the catalog's own
        # prices otherwise).
        self.cost = cost or _catalog_cost
        self.probe_interval_s = p.probe_interval_s
        self.panic_probe_interval_s = p.panic_probe_interval_s
        self.recovered_hold_s = p.recovered_hold_s
        self.table = RoutingTable({})
        self._last_probe: dict[tuple[str, str], float] = {}
        self._recovered: dict[tuple[str, str], float] = {}

    def update(self, table: RoutingTable) -> None:
        if table.epoch != self.table.epoch or table.version >= self.table.version:
            self.table = table

    def observe(self, key: tuple[str, str], up: bool, now: float | None = None) -> None:
        """What one attempt of this replica found. A target the table has open that just answered is
        used at once by this replica, without waiting for the pool's report to reach the Router and
        the Router's table to come back; a failure ends that trust."""
        now = time.time() if now is None else now
        if not up:
            self._recovered.pop(key, None)
            return
        h = self.table.get(key)
        if h is not None and h.state != "closed":
            self._recovered[key] = now

    def health(self, key: tuple[str, str], now: float | None = None) -> TargetHealth | None:
        """The table's word, unless this replica saw the target answer since the table's last change."""
        h = self.table.get(key)
        seen = self._recovered.get(key)
        if seen is None or h is None:
            return h
        now = time.time() if now is None else now
        if h.state == "closed" or h.changed_at > seen or now - seen > self.recovered_hold_s:
            del self._recovered[key]
            return h
        return replace(h, state="closed")

    def order(self, resolution: Resolution, now: float | None = None) -> list[Target]:
        now = time.time() if now is None else now
        healthy: list[Target] = []
        waiting: list[tuple[Target, TargetHealth]] = []
        for target in resolution.targets:
            h = self.health(target.key, now)
            # The catalog's order is the user's preference: a closed circuit keeps its place, and
            # a failing target is skipped once its circuit opens, not demoted on one error.
            if h is None or h.state == "closed":
                healthy.append(target)
            else:
                waiting.append((target, h))
        panic = not healthy
        probes: list[Target] = []
        for target, h in waiting:
            if panic and now >= h.hold_until:
                interval = self.panic_probe_interval_s
            elif h.state == "half_open" or now >= h.open_until:
                interval = self.probe_interval_s
            else:
                continue
            # One request per interval per replica probes the target, first in line.
            if now - self._last_probe.get(target.key, 0.0) >= interval:
                self._last_probe[target.key] = now
                probes.append(target)
        if resolution.smart_auto:
            def rank(t: Target) -> tuple[float, float]:
                h = self.table.get(t.key)
                return (-(h.score if h else 1.0), self.cost(t))
            healthy.sort(key=rank)
        ordered = probes + healthy
        if not ordered:
            raise UpstreamUnavailable(
                "Every provider for this model is temporarily unavailable (circuit open).",
                status=503,
                headers={"Retry-After": str(self._retry_after(waiting, now))},
            )
        return ordered

    def _retry_after(self, waiting: list[tuple[Target, TargetHealth]], now: float) -> int:
        # Nothing is usable, so the next probe is at most one panic interval away, unless every
        # target is held by its upstream's Retry-After.
        waits = [max(h.hold_until - now, self.panic_probe_interval_s) for _t, h in waiting]
        return max(1, math.ceil(min(waits, default=1.0)))
