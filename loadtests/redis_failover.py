"""Suite ``redis_failover``: the Redis primary is SIGKILLed under load while Sentinel promotes a
replica. Run against a gateway whose ``TREX_REDIS_URL`` is the ``redis+sentinel://`` URL of a set
started with ``python -m trex_serve.local.sentinel_set`` (its pid is ``--redis-fault-pid``: SIGUSR1
cuts replication, SIGUSR2 kills the current primary)::

    python -m loadtests.run redis_failover --host ... --admin-token T --catalog C --plan load \\
        --users 8 --run-time 12s --redis-fault-pid PID [--cut-replication-s 0.5]

With ``--cut-replication-s S`` replication is cut S seconds before the kill, so the old primary's
last writes never reach a replica. Checked: every answer is a 200 or a 503
``counter_store_unavailable`` in the OpenAI envelope (fail closed, never a cut connection, never
another error), the gateway answers 200 again after the promotion without a restart, and the
ledger charged exactly the credit-billed 200 answers (none lost, none twice) with the live balance
equal to the ledger's.

Kept in its own module; the runner (run.py) hands it the harness module (harness.py), as it did
when the harness lived in run.py itself, which ``python -m loadtests.run`` runs as ``__main__``."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from types import ModuleType
from typing import Any

import gevent

from loadtests.charges import check_charges
from loadtests.common import Record

REFUSAL = "counter_store_unavailable"


def suite_class(harness: ModuleType) -> type:
    class RedisFailover(harness.Suite):  # type: ignore[name-defined]
        ok_statuses = (503,)

        def prepare(self) -> Any:
            if not self.args.redis_fault_pid:
                raise SystemExit("redis_failover needs --redis-fault-pid (a trex_serve.local.sentinel_set process)")
            self.ctx.new_account(max(1, self.args.users), credits=self.args.credits)
            self.before = self.ctx.admin.usage(self.ctx.account["id"])
            model, premium = self.ctx.standard, self.ctx.premium
            self.kill_at = self.args.run_time * 0.3
            return harness.user_class(self.ctx, "RedisFailoverUser", lambda u: u.chat(
                premium if u.user_index % 2 else model, content="redis failover"), ok_statuses=(503,))

        def before_start(self) -> None:
            # Answers that take a moment, so that settlements are on their way when the primary goes.
            self.ctx.catalog.mock(self.ctx.primary).control(latency_ms=self.args.node_loss_latency_ms)

        def during(self, elapsed: float) -> None:
            if elapsed < self.kill_at or "kill" in self.ctx.marks:
                return
            pid = self.args.redis_fault_pid
            if self.args.cut_replication_s > 0:
                os.kill(pid, signal.SIGUSR1)
                self.ctx.mark("replication cut: the primary's writes from now on reach no replica")
                gevent.sleep(self.args.cut_replication_s)
            os.kill(pid, signal.SIGUSR2)
            self.ctx.marks["kill"] = time.time()
            self.ctx.mark(f"Redis primary SIGKILLed (at {time.time():.3f})")

        def check(self, recs: list[Record]) -> None:
            ctx = self.ctx
            kill = ctx.marks.get("kill")
            ctx.check(kill is not None, "redis_failover: the primary was never killed")
            kill = kill or time.time()
            refused = [r for r in recs if r.status == 503 and r.envelope_ok()
                       and (r.error or {}).get("code") == REFUSAL]
            bad = [r for r in recs if r not in refused and (r.status != 200 or r.exception)]
            ctx.check(not bad, f"redis_failover: {len(bad)} answers neither 200 nor 503 {REFUSAL}, e.g. "
                      + "; ".join(harness.describe(r) for r in bad[:3]))
            after = sorted((r for r in recs if r.started > kill and r.status == 200), key=lambda r: r.ended)
            ctx.check(bool(after), "redis_failover: nothing answered 200 after the primary was killed")
            back = after[0].ended - kill if after else None
            late = [r for r in refused if after and r.started > after[0].ended + 5]
            ctx.check(not late, f"redis_failover: {len(late)} requests refused more than 5 s after the gateway "
                      "served again")
            statuses = Counter(r.status for r in recs)
            ctx.notes.append(
                f"primary killed at {kill - ctx.marks['start']:.1f} s; first 200 after it "
                f"{back:.2f} s later; " if back is not None else "no 200 after the kill; ")
            ctx.notes.append(f"answers {dict(statuses)}; {len(refused)} x 503 {REFUSAL} "
                             f"({sum(r.started < kill for r in refused)} before the kill); max latency "
                             f"{max((r.latency_ms for r in recs), default=0):.0f} ms")
            check_charges(ctx, recs, self.before, "redis_failover", self.args.settle_timeout)

    return RedisFailover
