"""Headless Locust harness with asserted thresholds.

    python -m loadtests.run SUITE --users N --spawn-rate R --run-time 10s \\
        --host http://127.0.0.1:8000 --admin-token T --catalog config/catalog.yaml

SUITE is one of: steady, fallback, limits, billing, replica_loss, keys, node_loss, redis_failover (see
loadtests/README.md).
The harness prepares what the suite needs through the operator API (an account of its own, keys with
limits, credits), runs Locust programmatically (no web UI), switches mock-upstream faults mid-run where
the suite says so, prints req/s, p50/p95/p99 and TTFB, then checks the suite's assertions: exit 0 when
all hold, 1 with one line per miss otherwise (2 on a setup error)."""

from __future__ import annotations

import gevent.monkey  # noqa: I001  (Locust patches on import; make it explicit and first)

gevent.monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import requests  # noqa: E402
import yaml  # noqa: E402
from locust import constant, task  # noqa: E402
from locust.env import Environment  # noqa: E402

from loadtests.charges import check_charges  # noqa: E402
from loadtests.common import RECORDER, Admin, Mock, Record, TrexUser, percentile  # noqa: E402
from trex_serve.billing.prices import price_book  # noqa: E402
from trex_serve.billing.pricing import charge_micro  # noqa: E402
from trex_serve.catalog import load_catalog  # noqa: E402
from trex_serve.providers.usage import Usage  # noqa: E402

SUITES = ("steady", "routes", "fallback", "limits", "billing", "replica_loss", "keys", "node_loss", "redis_failover",
          "conversations")


# ------------------------------------------------------------------------------------ helpers


def parse_duration(text: str) -> float:
    text = text.strip().lower()
    total, num = 0.0, ""
    for ch in text:
        if ch.isdigit() or ch == ".":
            num += ch
        elif ch in "hms":
            total += float(num or 0) * {"h": 3600, "m": 60, "s": 1}[ch]
            num = ""
        else:
            raise argparse.ArgumentTypeError(f"bad duration {text!r} (use 10s, 1m30s)")
    return total + float(num or 0)


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


# ------------------------------------------------------------------------------------ suites


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


class Steady(Suite):
    """Mixed non-stream/stream chat on the standard model: zero failures, p99 under a generous bound."""

    def prepare(self):
        self.ctx.new_account(max(1, self.args.users))
        model = self.ctx.standard
        return user_class(self.ctx, "SteadyUser", lambda u: u.mixed(model, content="steady load"))

    def check(self, recs):
        self.ctx.check(len(recs) > 0, "steady: no request was made")
        self.all_ok(recs, "steady")
        missing = [r for r in recs if r.status == 200 and not r.usage]
        self.ctx.check(not missing, f"steady: {len(missing)} answers without usage")
        p99 = percentile([r.latency_ms for r in recs], 0.99)
        self.ctx.check(p99 <= self.args.p99_ms, f"steady: p99 {p99:.0f} ms over the bound {self.args.p99_ms:.0f} ms")


class Routes(Suite):
    """Anthropic's /v1/messages (whole and streamed) mixed with the OpenAI chat route on the same
    keys and model (translated for its openai-format providers), and passed through to a model on an
    anthropic-format provider when the catalog has one: zero failures, usage on every answer, every
    route exercised."""

    def prepare(self):
        self.native = self.ctx.catalog.anthropic_model()
        # credits for the pass-through model, which is often premium (Claude's prices)
        self.ctx.new_account(max(1, self.args.users), credits=50 if self.native else 0)
        model, native = self.ctx.standard, self.native

        def task(u):
            pick = random.random()
            if pick < 0.2:
                return u.messages(model, content="routes load")
            if pick < 0.4:
                return u.messages(model, content="routes load", stream=True)
            if pick < 0.6 and native:
                return u.messages(native, content="routes load", stream=pick < 0.5)
            return u.mixed(model, content="routes load")
        return user_class(self.ctx, "RoutesUser", task)

    def check(self, recs):
        self.all_ok(recs, "routes")
        kinds = {r.name.split(" ")[0] for r in recs}
        self.ctx.check({"messages", "chat", "stream"} <= kinds, f"routes: routes exercised {sorted(kinds)}")
        if self.native:
            passed = [r for r in recs if r.name == f"messages {self.native}" and r.status == 200]
            self.ctx.check(bool(passed), f"routes: no /v1/messages answer passed through for {self.native}")
        missing = [r for r in recs if r.status == 200 and not r.usage]
        self.ctx.check(not missing, f"routes: {len(missing)} answers without usage")


class Fallback(Suite):
    """Primary turns bad mid-run (503s, resets, a few hangs), then recovers. The backup stays healthy:
    no client-visible error, fallbacks visible in X-Trex-Attempts, traffic back on the primary after."""

    def prepare(self):
        self.ctx.new_account(max(1, self.args.users))
        self.fault_at = self.args.run_time * 0.25
        self.recover_at = self.args.run_time * 0.6
        model = self.ctx.standard
        return user_class(self.ctx, "FallbackUser", lambda u: u.mixed(model, content="fallback load"))

    def during(self, elapsed):
        if elapsed >= self.fault_at and "fault" not in self.ctx.marks:
            self.ctx.catalog.mock(self.ctx.primary).control(
                error_rate=0.5, error_status=503, reset_rate=0.15, hang_rate=self.args.hang_rate)
            self.ctx.mark("fault")
        if elapsed >= self.recover_at and "recover" not in self.ctx.marks:
            self.ctx.catalog.mock(self.ctx.primary).reset()
            self.ctx.mark("recover")

    def done(self, elapsed):
        if elapsed < self.args.run_time:
            return False
        since = self.ctx.marks.get("recover", time.time())
        back = [r for r in RECORDER.records if r.started > since and r.provider == self.ctx.primary]
        # The primary's circuit may be open: give it its cool-down (10 s, doubled per failed probe).
        return len(back) >= 3 or elapsed >= self.args.run_time + self.args.recovery_timeout

    def check(self, recs):
        fault, recover = self.ctx.marks["fault"], self.ctx.marks["recover"]
        self.all_ok(recs, "fallback (backup healthy throughout)")
        during = [r for r in recs if fault <= r.started < recover]
        fell = [r for r in during if r.attempts > 1 and r.status == 200]
        self.ctx.check(len(fell) > 0, f"fallback: no request during the fault showed X-Trex-Attempts > 1 "
                       f"({len(during)} requests in the fault window)")
        self.ctx.check(all(r.provider == self.ctx.backup for r in fell),
                       "fallback: a request with attempts > 1 was not answered by the backup")
        after = [r for r in recs if r.started > recover]
        back = [r for r in after if r.provider == self.ctx.primary]
        self.ctx.check(len(back) > 0, f"fallback: no traffic returned to {self.ctx.primary} after recovery "
                       f"({len(after)} requests after, providers {dict(Counter(r.provider for r in after))})")
        fbt = self.ctx.catalog.first_byte_timeout(self.ctx.primary)
        slow = [r for r in fell if r.latency_ms >= fbt * 1000 * 0.9]
        returned = min((r.started for r in back), default=None)
        self.ctx.notes.append(
            f"fault window: {len(during)} requests, {len(fell)} fell back (attempts>1), "
            f"{len(slow)} after a first-byte timeout (~{fbt}s); providers during fault "
            f"{dict(Counter(r.provider for r in during))}; primary serving again "
            f"{'%.1f s' % (returned - recover) if returned else 'never'} after recovery")


class Limits(Suite):
    """Several keys with small RPM and concurrency limits hammered in parallel."""

    ok_statuses = (429,)

    def prepare(self):
        a = self.args
        self.rpm_limits = [a.rpm] * a.rpm_keys
        self.conc_limits = [1] + [2] * max(0, a.conc_keys - 1)
        limits = [{"rpm": r} for r in self.rpm_limits] + [{"concurrency": c} for c in self.conc_limits]
        self.ctx.new_account(len(limits), limits)
        self.n_rpm = len(self.rpm_limits)
        model = self.ctx.standard
        n_keys = len(limits)

        def body(u: TrexUser) -> None:
            idx = u.user_index % n_keys
            if idx < self.n_rpm:
                u.chat(model, key_index=idx, name="rpm key", content="limits")
                gevent.sleep(0.05)
                return
            # Bursts of parallel requests, a third of them streams dropped after the first chunk.
            jobs = []
            for i in range(3):
                if i == 2:
                    jobs.append(gevent.spawn(u.chat_stream, model, key_index=idx, name="concurrency key",
                                             abort_after_chunks=1, content="limits"))
                else:
                    jobs.append(gevent.spawn(u.chat, model, key_index=idx, name="concurrency key",
                                             content="limits"))
            gevent.joinall(jobs)

        return user_class(self.ctx, "LimitsUser", body, ok_statuses=(429,))

    def before_start(self):
        # Slow answers make the concurrency limits bite.
        self.ctx.catalog.mock(self.ctx.primary).control(latency_ms=self.args.limits_latency_ms)
        # Stay inside one fixed 60-s RPM window (the counters' clock: Redis, on this machine).
        left = 60 - time.time() % 60
        need = self.args.run_time + 4
        if left < need:
            print(f"  waiting {left + 0.3:.1f} s for the next minute window", flush=True)
            time.sleep(left + 0.3)

    def check(self, recs):
        ctx = self.ctx
        start_window = int(ctx.marks["start"] // 60)
        for idx, limit in enumerate(self.rpm_limits):
            mine = [r for r in recs if r.key_index == idx]
            by_window: dict[int, int] = defaultdict(int)
            for r in mine:
                if r.status == 200:
                    reset = _seconds(r.headers.get("x-ratelimit-reset-requests"))
                    mid = (r.started + r.ended) / 2
                    by_window[round((mid + reset) / 60) - 1 if reset is not None else int(mid // 60)] += 1
            first = by_window.get(start_window, 0)
            ctx.check(first == limit, f"limits: rpm key {idx} (rpm={limit}) admitted {first} in its first window, "
                      f"expected exactly {limit} ({len(mine)} requests sent; by window {dict(by_window)})")
            over = {w: n for w, n in by_window.items() if n > limit}
            ctx.check(not over, f"limits: rpm key {idx} admitted over its limit in windows {over}")
            wrong = [r for r in mine if r.status == 429 and (r.error or {}).get("code") != "rate_limit_exceeded"]
            ctx.check(not wrong, f"limits: rpm key {idx}: {len(wrong)} rejections not rate_limit_exceeded, "
                      f"e.g. {describe(wrong[0]) if wrong else ''}")
            ctx.notes.append(f"rpm key {idx} (rpm={limit}): {len(mine)} sent, {first} admitted in window, "
                             f"{sum(r.status == 429 for r in mine)} rejected")
        for j, limit in enumerate(self.conc_limits):
            idx = self.n_rpm + j
            mine = [r for r in recs if r.key_index == idx]
            ok = sum(r.status == 200 for r in mine)
            rejected = [r for r in mine if r.status == 429]
            ctx.check(ok > 0, f"limits: concurrency key {idx} (concurrency={limit}) had no request admitted")
            ctx.check(len(rejected) > 0, f"limits: concurrency key {idx} (concurrency={limit}) was never refused "
                      f"({len(mine)} requests in bursts of 3)")
            wrong = [r for r in rejected if (r.error or {}).get("code") != "concurrency_limit_exceeded"]
            ctx.check(not wrong, f"limits: concurrency key {idx}: {len(wrong)} rejections not "
                      f"concurrency_limit_exceeded, e.g. {describe(wrong[0]) if wrong else ''}")
            # Client-side bound: each admitted request holds the slot for at least the upstream latency.
            lat = max(self.args.limits_latency_ms, 1) / 1000
            bound = limit * (self.ctx.extra["duration"] / lat + 2)
            ctx.check(ok <= bound, f"limits: concurrency key {idx} admitted {ok} requests, more than "
                      f"{limit} slots x {self.ctx.extra['duration']:.1f}s / {lat}s allow ({bound:.0f})")
            ctx.notes.append(f"concurrency key {idx} (concurrency={limit}): {len(mine)} sent, {ok} admitted, "
                             f"{len(rejected)} rejected")
        bad = [r for r in recs if r.status not in (200, 429) or (r.exception and not r.aborted)]
        ctx.check(not bad, f"limits: {len(bad)} requests neither admitted nor refused with 429, e.g. "
                  + "; ".join(describe(r) for r in bad[:3]))
        rejected = [r for r in recs if r.status == 429]
        no_env = [r for r in rejected if not r.envelope_ok()]
        ctx.check(not no_env, f"limits: {len(no_env)} rejections without the OpenAI error envelope")
        no_ra = [r for r in rejected if not _int_ge1(r.headers.get("retry-after"))]
        ctx.check(not no_ra, f"limits: {len(no_ra)} rejections without Retry-After (integer >= 1), e.g. "
                  f"{no_ra[0].headers if no_ra else ''}")
        self.no_leak()

    def no_leak(self):
        """After the run (streams dropped by the client included), the concurrency-1 key has its slot back."""
        ctx = self.ctx
        key = ctx.keys[self.n_rpm]["key"]
        import requests
        t0 = time.time()
        first, status, body = None, None, ""
        while True:
            resp = requests.post(f"{self.args.host}/v1/chat/completions", timeout=10,
                                 headers={"Authorization": f"Bearer {key}"},
                                 json={"model": ctx.standard, "messages": [{"role": "user", "content": "leak?"}]})
            status, body = resp.status_code, resp.text[:200]
            first = status if first is None else first
            if status == 200 or time.time() - t0 > self.args.leak_grace:
                break
            time.sleep(0.1)
        ctx.notes.append(f"concurrency-1 key after the run: first request {first}, "
                         f"{'admitted' if status == 200 else 'refused'} after {time.time() - t0:.2f} s")
        ctx.check(status == 200, f"limits: leaked concurrency slot: the concurrency-1 key is still refused "
                  f"{self.args.leak_grace}s after the run ({status} {body})")


class Billing(Suite):
    """Premium (credits) and standard (quota) traffic with failures injected; the ledger must equal the
    sum of what the 200 answers reported, and the live balance the ledger balance."""

    ok_statuses = (502, 503)

    def prepare(self):
        self.ctx.new_account(max(1, self.args.users), credits=self.args.credits)
        self.before = self.ctx.admin.usage(self.ctx.account["id"])
        std, prem = self.ctx.standard, self.ctx.premium

        def body(u: TrexUser) -> None:
            model = prem if (u.user_index + len(RECORDER.records)) % 2 else std
            u.mixed(model, content="billing load " * (1 + u.user_index % 3))

        return user_class(self.ctx, "BillingUser", body, ok_statuses=self.ok_statuses)

    def before_start(self):
        cat = self.ctx.catalog
        for model in (self.ctx.standard, self.ctx.premium):
            chain = cat.candidates(model)
            cat.mock(chain[0]).control(error_rate=self.args.error_rate, error_status=503)
            cat.mock(chain[1]).control(error_rate=self.args.backup_error_rate, error_status=503)

    def check(self, recs):
        ctx = self.ctx
        bad = [r for r in recs if r.exception or (r.status != 200 and not (
            r.status in (502, 503) and r.envelope_ok()))]
        ctx.check(not bad, f"billing: {len(bad)} answers neither 200 nor an upstream_unavailable envelope, e.g. "
                  + "; ".join(describe(r) for r in bad[:3]))
        ok = [r for r in recs if r.status == 200 and not r.exception]
        no_usage = [r for r in ok if not r.usage]
        ctx.check(not no_usage, f"billing: {len(no_usage)} 200 answers without usage")
        prem = [r for r in ok if r.model == ctx.premium]
        std = [r for r in ok if r.model == ctx.standard]
        wrong = [r for r in prem if r.headers.get("x-trex-billing") != "credits"]
        ctx.check(not wrong, f"billing: {len(wrong)} premium answers not billed in credits")
        ctx.check(len(prem) > 0 and len(std) > 0, "billing: need both premium and standard answers")
        expected = sum(ctx.catalog.cost_micro(r.model, r.usage or {}, r.provider,
                                              r.headers.get("x-trex-upstream-model"), ctx.args.plan)
                       for r in ok if r.headers.get("x-trex-billing") == "credits")
        quota_reqs = [r for r in ok if r.headers.get("x-trex-billing") == "quota"]
        quota_tokens = sum(int((r.usage or {}).get("total_tokens", 0)) for r in quota_reqs)
        acc = ctx.account["id"]
        b0 = self.before["credits"]
        deadline, after = time.time() + self.args.settle_timeout, None
        while True:  # the ledger is written behind the answers: wait for it to settle
            after = ctx.admin.usage(acc)
            charged = after["credits"]["charged_micro"] - b0["charged_micro"]
            ledger_now = after["credits"].get("ledger_balance_micro", after["credits"]["balance_micro"])
            if charged == expected and after.get("live_balance_micro") == ledger_now:
                break
            if time.time() > deadline:
                break
            time.sleep(0.3)
        refunded = after["credits"]["refunded_micro"] - b0["refunded_micro"]
        ctx.check(charged == expected, f"billing: ledger charged {charged} micro-credits, the 200 answers' usage "
                  f"at the gateway's class prices sums to {expected} (diff {charged - expected})")
        live = after.get("live_balance_micro")
        ledger = after["credits"].get("ledger_balance_micro", after["credits"]["balance_micro"])
        ctx.check(live == ledger, f"billing: live balance {live} != ledger balance {ledger}")
        q = after.get("quota") or {}
        q0 = self.before.get("quota") or {}
        used = q.get("requests_used", 0) - q0.get("requests_used", 0)
        ctx.check(used == len(quota_reqs), f"billing: quota requests used {used}, quota-billed 200 answers "
                  f"{len(quota_reqs)}")
        tok = q.get("tokens_used", 0) - q0.get("tokens_used", 0)
        ctx.check(tok == quota_tokens, f"billing: quota tokens used {tok}, quota-billed 200 answers reported "
                  f"{quota_tokens} tokens")
        failed = [r for r in recs if r.status in (502, 503)]
        fell = [r for r in ok if r.attempts > 1]
        ctx.notes.append(f"{len(ok)} answered ({len(prem)} premium, {len(std)} standard), {len(fell)} after a "
                         f"fallback, {len(failed)} failed overall; ledger charged {charged} micro "
                         f"(expected {expected}), refunded {refunded}; balance {ledger} micro (live {live}); "
                         f"quota requests {used}, tokens {tok} (client-side total_tokens {quota_tokens})")


class ReplicaLoss(Suite):
    """One ProviderPool replica process is killed under load; answers stay well-formed and bounded, and
    the pool answers again afterwards."""

    ok_statuses = (502, 503, 504)

    def prepare(self):
        self.ctx.new_account(max(1, self.args.users))
        model = self.ctx.standard
        self.kill_at = self.args.run_time * 0.3
        return user_class(self.ctx, "ReplicaLossUser", lambda u: u.mixed(model, content="replica loss"),
                          ok_statuses=self.ok_statuses)

    def during(self, elapsed):
        if elapsed >= self.kill_at and "kill" not in self.ctx.marks:
            pids = find_replica_pids(f"ServeReplica:{self.args.app_name}:pool-{self.ctx.primary}", self.args.host)
            self.ctx.extra["killed"] = pids
            for pid in pids[:1]:
                os.kill(pid, signal.SIGKILL)
            self.ctx.mark(f"kill (pid {pids[:1]})")
            self.ctx.marks["kill"] = time.time()

    def check(self, recs):
        ctx = self.ctx
        ctx.check(bool(ctx.extra.get("killed")), f"replica_loss: no replica process of pool-{ctx.primary} found "
                  "to kill")
        bad = [r for r in recs if r.exception or (r.status != 200 and not r.envelope_ok())]
        ctx.check(not bad, f"replica_loss: {len(bad)} answers neither a success nor an OpenAI envelope, e.g. "
                  + "; ".join(describe(r) for r in bad[:3]))
        slow = [r for r in recs if r.latency_ms > self.args.hang_bound * 1000]
        ctx.check(not slow, f"replica_loss: {len(slow)} requests took over {self.args.hang_bound}s")
        kill = ctx.marks.get("kill", time.time())
        after = [r for r in recs if r.started > kill]
        ctx.check(any(r.status == 200 for r in after), "replica_loss: nothing succeeded after the kill")
        # The pool answers again: a request served by the primary (the replacement replica).
        import requests
        key = ctx.keys[0]["key"]
        t0, served = time.time(), None
        while time.time() - t0 < self.args.recovery_timeout:
            try:
                resp = requests.post(f"{self.args.host}/v1/chat/completions", timeout=10,
                                     headers={"Authorization": f"Bearer {key}"},
                                     json={"model": ctx.standard, "messages": [{"role": "user", "content": "back?"}]})
                if resp.status_code == 200 and resp.headers.get("x-trex-upstream-provider") == ctx.primary:
                    served = time.time() - kill
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        ctx.check(served is not None, f"replica_loss: pool-{ctx.primary} did not answer again within "
                  f"{self.args.recovery_timeout}s after the run")
        errors = Counter(f"{r.status} {(r.error or {}).get('code')}" for r in recs if r.status != 200)
        example = next((r for r in recs if r.status != 200), None)
        if example is not None:
            ctx.notes.append(f"first error: {describe(example)}: {(example.error or {}).get('message')!r}")
        ctx.notes.append(f"killed pid {ctx.extra.get('killed', [])[:1]}; {len(after)} requests after the kill, "
                         f"errors {dict(errors)}; max latency {max((r.latency_ms for r in recs), default=0):.0f} ms; "
                         f"pool-{ctx.primary} serving again {served:.1f} s after the kill" if served else
                         f"killed pid {ctx.extra.get('killed')}; errors {dict(errors)}")


class Keys(Suite):
    """Several managed keys on the primary (catalog ``keys``), many accounts. Mid-run one key is
    switched to 429 on the mock (matched by the credential it receives, read from the key's
    environment variable, which the harness must share with the gateway). Checked: no client
    error, nothing falls back to another provider, the hot key receives at most one request per
    user after the switch (its cool-down is shared through Redis), the other keys take its share,
    and /metrics shows it cooling."""

    def prepare(self):
        spec = self.ctx.catalog.providers[self.ctx.primary]
        keys = spec.get("keys") or []
        if len(keys) < 2:
            raise SystemExit(f"keys: provider {self.ctx.primary} has fewer than two managed keys in the catalog")
        self.secrets = {k.get("id") or k["env"]: os.environ.get(k["env"], "") for k in keys}
        if not all(self.secrets.values()):
            raise SystemExit("keys: the harness needs the managed keys' environment variables of the gateway")
        hot = self.args.hot_key or next(iter(self.secrets))
        self.hot = hot
        self.fault_at = self.args.run_time * 0.3
        accounts = [self.ctx.admin.create_account(f"load-keys-{uuid.uuid4().hex[:6]}", self.args.plan)
                    for _ in range(self.args.key_accounts)]
        self.ctx.account = accounts[0]
        self.ctx.keys = [self.ctx.admin.create_key(a["id"], "load-keys") for a in accounts]
        self.mock = self.ctx.catalog.mock(self.ctx.primary)
        self.mock.reset()
        model = self.ctx.standard
        return user_class(self.ctx, "KeysUser", lambda u: u.mixed(model, content="keys load"))

    def _received(self) -> dict[str, int]:
        by_secret = self.mock.stats().get("by_key", {})
        return {kid: by_secret.get(secret, 0) for kid, secret in self.secrets.items()}

    def during(self, elapsed):
        if elapsed >= self.fault_at and "fault" not in self.ctx.marks:
            self.before = self._received()
            self.mock.control(key_faults={self.secrets[self.hot]: {"status": 429, "retry_after": 600}})
            self.ctx.mark("fault")

    def check(self, recs):
        self.all_ok(recs, "keys (one key at 429, the others healthy)")
        others = [r for r in recs if r.provider != self.ctx.primary]
        self.ctx.check(not others, f"keys: {len(others)} requests left {self.ctx.primary} although keys were healthy")
        after = self._received()
        hot_after = after[self.hot] - self.before[self.hot]
        self.ctx.check(hot_after <= self.args.users,
                       f"keys: {self.hot} received {hot_after} requests after its 429 (bound {self.args.users})")
        moved = {k: after[k] - self.before[k] for k in after if k != self.hot}
        self.ctx.check(sum(moved.values()) > 0, "keys: no other key served after the switch")
        metrics = requests.get(f"{self.args.host}/metrics", timeout=10).text
        line = f'trex_upstream_key_state{{key="{self.hot}",provider="{self.ctx.primary}",state="cooling"}} 1.0'
        self.ctx.check(line in metrics, f"keys: /metrics does not show {self.hot} cooling")
        self.ctx.check(not any(v in metrics for v in self.secrets.values()), "keys: a key's secret is in /metrics")
        self.ctx.notes.append(f"per key before the switch {self.before}; after it {self.hot} +{hot_after}, "
                              f"others {moved}")


class NodeLoss(Suite):
    """A whole Ray node is lost under load: its raylet and every process under it (ingress and pool
    replicas) are SIGKILLed. Every answer is a success or an OpenAI envelope (no cut connection, no
    bare HAProxy 500), and the gateway keeps answering. Non-streaming requests, so that "nothing of
    the answer had reached the client" holds for every request in flight. Half the users ask the
    premium model: the requests replayed on another replica are charged once (charges.py)."""

    def prepare(self):
        if not self.args.kill_raylet_pid:
            raise SystemExit("node_loss needs --kill-raylet-pid (the raylet of the node to lose)")
        self.ctx.new_account(max(1, self.args.users), credits=self.args.credits)
        self.before = self.ctx.admin.usage(self.ctx.account["id"])
        model, premium = self.ctx.standard, self.ctx.premium
        self.kill_at = self.args.run_time * 0.3
        return user_class(self.ctx, "NodeLossUser",
                          lambda u: u.chat(premium if u.user_index % 2 else model, content="node loss"))

    def before_start(self):
        # Requests that take a while, so that several are in flight on the lost node when it goes.
        self.ctx.catalog.mock(self.ctx.primary).control(latency_ms=self.args.node_loss_latency_ms)

    def during(self, elapsed):
        if elapsed >= self.kill_at and "kill" not in self.ctx.marks:
            self.ctx.extra["killed"] = kill_tree(self.args.kill_raylet_pid)
            self.ctx.marks["kill"] = time.time()
            self.ctx.mark(f"node lost: SIGKILL raylet {self.args.kill_raylet_pid} and "
                          f"{len(self.ctx.extra['killed']) - 1} processes under it (at {time.time():.3f})")

    def check(self, recs):
        ctx = self.ctx
        ctx.check(bool(ctx.extra.get("killed")), f"node_loss: raylet {self.args.kill_raylet_pid} not found")
        cut = [r for r in recs if r.exception or r.status is None]
        bare = [r for r in recs if r.status not in (None, 200) and not r.envelope_ok()]
        ctx.check(not cut, f"node_loss: {len(cut)} requests lost their connection, e.g. "
                  + "; ".join(describe(r) for r in cut[:3]))
        ctx.check(not bare, f"node_loss: {len(bare)} errors without the OpenAI envelope, e.g. "
                  + "; ".join(describe(r) for r in bare[:3]))
        kill = ctx.marks.get("kill", time.time())
        after = [r for r in recs if r.started > kill + 1]
        ctx.check(any(r.status == 200 for r in after), "node_loss: nothing succeeded after the node was lost")
        around = [r for r in recs if r.started <= kill < r.ended]
        errors = Counter(f"{r.status} {(r.error or {}).get('code')}" for r in recs if r.status not in (None, 200))
        ctx.notes.append(f"node lost at {kill - ctx.marks['start']:.1f} s: {len(around)} requests in flight then, "
                         f"{sum(r.status == 200 for r in around)} of them answered 200; overall "
                         f"{sum(r.status == 200 for r in recs)} x 200, errors {dict(errors)}, {len(cut)} cut; "
                         f"max latency {max((r.latency_ms for r in recs), default=0):.0f} ms")
        check_charges(ctx, recs, self.before, "node_loss", self.args.settle_timeout)


def kill_tree(pid: int) -> list[int]:
    """SIGKILL a process and everything under it (a node loss: the raylet and its workers)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return [p.pid for p in procs]


def _seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return float(value.rstrip("s"))
    except ValueError:
        return None


def _int_ge1(value: str | None) -> bool:
    try:
        return value is not None and int(value) >= 1
    except ValueError:
        return False


def find_replica_pids(title: str, host: str) -> list[int]:
    """Processes whose title names the Serve replica (`ray::ServeReplica:trex:pool-alpha...`). Several
    gateways may share the machine: prefer the ones whose environment carries this gateway's HTTP port."""
    port = host.rsplit(":", 1)[-1].split("/")[0]
    mine, others = [], []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if title not in cmd:
                continue
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"TREX_HTTP_PORT={port}".encode() in env:
            mine.append(int(entry))
        elif not any(e.startswith(b"TREX_HTTP_PORT=") for e in env):
            others.append(int(entry))
    return mine or others


SUITE_CLASSES: dict[str, type[Suite]] = {"steady": Steady, "routes": Routes, "fallback": Fallback, "limits": Limits,
                                          "billing": Billing, "replica_loss": ReplicaLoss, "keys": Keys,
                                          "node_loss": NodeLoss}


# ------------------------------------------------------------------------------------ main


def report(ctx: Ctx, env: Environment, recs: list[Record], duration: float) -> None:
    total = env.stats.total
    lat = [r.latency_ms for r in recs]
    ttfb = [r.ttfb_ms for r in recs if r.ttfb_ms is not None and r.status == 200]
    statuses = Counter(str(r.status) if r.status else "no-answer" for r in recs)
    rps = len(recs) / max(duration, 1e-9)
    print(f"\n== {ctx.args.suite}: {len(recs)} requests in {duration:.1f} s = {rps:.1f} req/s"
          f" ({ctx.args.users} users); locust failures {total.num_failures}")
    print(f"   latency ms  p50 {percentile(lat, .5):.0f}  p95 {percentile(lat, .95):.0f}  "
          f"p99 {percentile(lat, .99):.0f}  max {max(lat, default=0):.0f}")
    print(f"   TTFB ms     p50 {percentile(ttfb, .5):.0f}  p95 {percentile(ttfb, .95):.0f}  "
          f"p99 {percentile(ttfb, .99):.0f}")
    print(f"   statuses {dict(statuses)}  providers {dict(Counter(r.provider for r in recs))}")
    for note in ctx.notes:
        print(f"   {note}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=SUITES)
    p.add_argument("--users", type=int, default=10)
    p.add_argument("--spawn-rate", type=float, default=10)
    p.add_argument("--run-time", type=parse_duration, default=parse_duration("30s"))
    p.add_argument("--host", default=os.environ.get("TREX_LOADTEST_HOST", "http://127.0.0.1:8000"))
    p.add_argument("--admin-token", default=os.environ.get("TREX_ADMIN_TOKEN"))
    p.add_argument("--catalog", default=os.environ.get("TREX_CATALOG"),
                   help="the gateway's catalog YAML (mock URLs, candidate chains, prices)")
    p.add_argument("--plan", default="free", help="plan of the accounts the suite creates")
    p.add_argument("--standard-model", default=None)
    p.add_argument("--premium-model", default=None)
    p.add_argument("--app-name", default="trex", help="Serve application name (replica_loss)")
    p.add_argument("--request-timeout", type=float, default=15.0, help="client bound per request (s)")
    p.add_argument("--p99-ms", type=float, default=5000.0, help="steady: p99 latency bound")
    p.add_argument("--hang-rate", type=float, default=0.03, help="fallback: hang rate of the primary")
    p.add_argument("--recovery-timeout", type=float, default=45.0,
                   help="fallback/replica_loss: how long the primary may take to serve again (s)")
    p.add_argument("--rpm", type=int, default=5, help="limits: RPM of each rate-limited key")
    p.add_argument("--rpm-keys", type=int, default=2)
    p.add_argument("--conc-keys", type=int, default=2, help="limits: keys with concurrency 1, 2, 2...")
    p.add_argument("--limits-latency-ms", type=float, default=150.0)
    p.add_argument("--leak-grace", type=float, default=2.0, help="limits: seconds a slot may take to free")
    p.add_argument("--credits", type=float, default=1000.0, help="billing: credits granted")
    p.add_argument("--error-rate", type=float, default=0.3, help="billing: primary error rate")
    p.add_argument("--backup-error-rate", type=float, default=0.1, help="billing: backup error rate")
    p.add_argument("--settle-timeout", type=float, default=20.0)
    p.add_argument("--hang-bound", type=float, default=10.0, help="replica_loss: no request over this (s)")
    p.add_argument("--key-accounts", type=int, default=12, help="keys: accounts (each sticks to one key)")
    p.add_argument("--hot-key", default=None, help="keys: id of the key switched to 429 (default the first)")
    p.add_argument("--kill-raylet-pid", type=int, default=0, help="node_loss: the raylet of the node to lose")
    p.add_argument("--node-loss-latency-ms", type=int, default=300,
                   help="node_loss, redis_failover: upstream latency, so requests are in flight when it goes")
    p.add_argument("--redis-fault-pid", type=int, default=0,
                   help="redis_failover: a `python -m trex_serve.local.sentinel_set` process")
    p.add_argument("--turns", type=int, default=6, help="conversations: turns of each chained conversation")
    p.add_argument("--cut-replication-s", type=float, default=0.0,
                   help="redis_failover: cut replication this long before the primary is killed")
    return p


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.admin_token or not args.catalog:
        print("--admin-token and --catalog (or TREX_ADMIN_TOKEN / TREX_CATALOG) are required", file=sys.stderr)
        return 2
    args.host = args.host.rstrip("/")
    STOP["now"] = False
    INFLIGHT["n"] = 0
    RECORDER.clear()
    ctx = Ctx(args)
    if args.suite == "redis_failover":  # its own module, handed this harness (see its docstring)
        from loadtests.redis_failover import suite_class

        SUITE_CLASSES["redis_failover"] = suite_class(sys.modules[__name__])
    if args.suite == "conversations":
        from loadtests.conversations import suite_class as conversations

        SUITE_CLASSES["conversations"] = conversations(sys.modules[__name__])
    suite = SUITE_CLASSES[args.suite](ctx)
    print(f"suite {args.suite}: {args.users} users, spawn rate {args.spawn_rate}/s, {args.run_time:g} s against "
          f"{args.host} (standard {ctx.standard}: {ctx.primary} -> {ctx.backup}; premium {ctx.premium})", flush=True)
    try:
        user = suite.prepare()
        suite.before_start()
        env = Environment(user_classes=[user], host=args.host)
        runner = env.create_local_runner()
        ctx.mark("start")
        runner.start(args.users, spawn_rate=args.spawn_rate)
        t0 = time.time()
        while True:
            elapsed = time.time() - t0
            suite.during(elapsed)
            if suite.done(elapsed):
                break
            gevent.sleep(0.1)
        # Let every in-flight request finish (the suites count what was answered), then stop.
        STOP["now"] = True
        ctx.mark("stopping")
        deadline = time.time() + args.request_timeout + 5
        while INFLIGHT["n"] > 0 and time.time() < deadline:
            gevent.sleep(0.05)
        duration = time.time() - t0
        ctx.extra["duration"] = duration
        runner.quit()
        recs = list(RECORDER.records)
        suite.check(recs)
        report(ctx, env, recs, duration)
    except Exception as err:
        print(f"SETUP/RUN ERROR in suite {args.suite}: {type(err).__name__}: {err}", file=sys.stderr)
        import traceback
        traceback.print_exc()
        return 2
    finally:
        suite.cleanup()
    if ctx.misses:
        print(f"\nFAIL {args.suite}: {len(ctx.misses)} threshold(s) missed")
        for m in ctx.misses:
            print(f"  - {m}")
        return 1
    print(f"\nPASS {args.suite}")
    return 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
