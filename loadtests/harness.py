"""What every load suite shares: the catalog as the harness reads it, the run's context (its
accounts, marks and misses), the Locust user class a suite builds, and the Suite base class."""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import yaml
from locust import constant, task

from loadtests.common import Admin, Mock, Record, TrexUser
from trex_serve.billing.prices import price_book
from trex_serve.billing.pricing import charge_micro
from trex_serve.catalog import load_catalog
from trex_serve.providers.usage import Usage


class Catalog:
    def __init__(self, path: str) -> None:
        self.raw = yaml.safe_load(Path(path).read_text())
        self.providers = {p["name"]: p for p in self.raw.get("providers") or []}
        self.models = {m["id"]: m for m in self.raw.get("models") or []}
        # The gateway's own prices per token class (catalog, else price database with the markup, else
        # the input/output price): the YAML's input/output numbers alone miss cache classes and
        # models the catalog leaves unpriced.
        self.parsed = load_catalog(path)
        self.prices = price_book(self.parsed)

    def pick_model(self, tier: str) -> str:
        for mid, m in self.models.items():
            if m.get("tier", "standard") == tier and len(m.get("candidates") or []) >= 2:
                return mid
        raise SystemExit(f"the catalog has no {tier}-tier model with two candidates")

    def candidates(self, model: str) -> list[str]:
        return [c["provider"] for c in self.models[model]["candidates"]]

    def anthropic_model(self) -> str | None:
        """A model whose first candidate speaks Anthropic's API (/v1/messages passed through), if any."""
        for mid, m in self.models.items():
            first = (m.get("candidates") or [{}])[0]
            if self.providers.get(first.get("provider"), {}).get("format") == "anthropic":
                return mid
        return None

    def cost_micro(self, model: str, usage: dict, provider: str | None, upstream: str | None, plan: str | None) -> int:
        """Micro-credits the gateway charges for an answer's usage (OpenAI's fields, as the client saw
        them) served by ``provider``/``upstream``: each token class at its price, rounded up once. The
        client's fields do not tell 1-hour cache writes apart: they count here as 5-minute ones."""
        prices = self.prices.for_target(self.parsed.model(model), provider, upstream, plan)
        return charge_micro(Usage.from_openai(usage) or Usage(), prices)

    def mock(self, provider: str) -> Mock:
        return Mock(self.providers[provider]["base_url"])

    def first_byte_timeout(self, provider: str) -> float:
        p = self.providers[provider]
        return float(p.get("first_byte_timeout_s") or p.get("timeout_s") or 60)


class Ctx:
    """What a suite run knows: arguments, catalog, operator API, its keys and its findings."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.catalog = Catalog(args.catalog)
        self.admin = Admin(args.host, args.admin_token)
        self.standard = args.standard_model or self.catalog.pick_model("standard")
        self.premium = args.premium_model or self.catalog.pick_model("premium")
        chain = self.catalog.candidates(self.standard)
        self.primary, self.backup = chain[0], chain[1]
        self.marks: dict[str, float] = {}   # named moments of the run (wall clock)
        self.misses: list[str] = []
        self.notes: list[str] = []
        self.account: dict = {}
        self.keys: list[dict] = []
        self.extra: dict[str, Any] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = time.time()
        print(f"  [{time.strftime('%H:%M:%S')}] {name}", flush=True)

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.misses.append(message)

    def new_account(self, n_keys: int, limits: list[dict | None] | None = None, credits: float = 0) -> None:
        tag = f"load-{self.args.suite}-{uuid.uuid4().hex[:6]}"
        self.account = self.admin.create_account(tag, self.args.plan)
        limits = limits or [None] * n_keys
        self.keys = [self.admin.create_key(self.account["id"], f"{tag}-{i}", limits[i]) for i in range(n_keys)]
        if credits:
            self.admin.grant(self.account["id"], credits, f"{tag} credits")


def user_class(ctx: Ctx, name: str, body: Callable[[TrexUser], None], ok_statuses=(), wait: float = 0.0,
               keys: list[str] | None = None) -> type[TrexUser]:
    """A TrexUser subclass whose single task is ``body(self)``."""

    def load_task(self: TrexUser) -> None:
        if STOP["now"]:
            gevent.sleep(0.05)
            return
        INFLIGHT["n"] += 1
        try:
            body(self)
        finally:
            INFLIGHT["n"] -= 1

    attrs = {
        "keys": keys if keys is not None else [k["key"] for k in ctx.keys],
        "ok_statuses": frozenset(ok_statuses),
        "request_timeout_s": ctx.args.request_timeout,
        "wait_time": constant(wait),
        "abstract": False,
        "_counter": 0,
        "load_task": task(load_task),
    }
    return type(name, (TrexUser,), attrs)


STOP = {"now": False}
INFLIGHT = {"n": 0}


class Suite:
    """prepare() -> the user class; during(elapsed) runs fault switches; done(elapsed) says when to stop;
    check() appends misses."""

    ok_statuses: tuple[int, ...] = ()

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.args = ctx.args

    def prepare(self) -> type[TrexUser]:
        raise NotImplementedError

    def before_start(self) -> None:
        pass

    def during(self, elapsed: float) -> None:
        pass

    def done(self, elapsed: float) -> bool:
        return elapsed >= self.args.run_time

    def check(self, recs: list[Record]) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        for provider in (self.ctx.primary, self.ctx.backup):
            try:
                self.ctx.catalog.mock(provider).reset()
            except Exception as err:  # a mock that is gone is not the suite's verdict
                print(f"  (could not reset the mock of {provider}: {err})")

    # shared checks
    def all_ok(self, recs: list[Record], what: str) -> None:
        bad = [r for r in recs if r.status != 200 or r.exception]
        self.ctx.check(not bad, f"{what}: {len(bad)} of {len(recs)} requests did not succeed, e.g. "
                       + "; ".join(describe(r) for r in bad[:3]))


def describe(r: Record) -> str:
    code = (r.error or {}).get("code")
    return (f"{'stream' if r.stream else 'chat'} {r.model} -> {r.status} {code or ''} {r.exception or ''} "
            f"attempts={r.attempts} provider={r.provider} {r.latency_ms:.0f}ms").strip()
