"""The suites that break something under load and assert on what the clients saw: replica_loss,
keys (a managed key switched to 429) and node_loss, with the process helpers they kill with."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import requests

from loadtests.charges import check_charges
from loadtests.harness import Suite, describe, user_class


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
