"""The suites that shape traffic and assert on its answers: steady, routes, fallback, limits and
billing (each a Suite: what it prepares, the faults it switches, the thresholds it checks)."""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict

import gevent
import requests

from loadtests.common import RECORDER, TrexUser, percentile
from loadtests.harness import Suite, describe, user_class


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
