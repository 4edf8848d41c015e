"""Outage recovery: steady traffic on one model while every candidate provider answers 503, then all
of them healed. Measures how long the model stays dark after the heal, whether it keeps answering
from then on, and how often the gateway still tried a provider while it was down.

    python -m loadtests.outage --host http://127.0.0.1:8000 --admin-token T --catalog catalog.yaml \\
        [--model gpt-4o-mini] [--rate 10] [--warmup 3] [--outage 45] [--after 10]

The mocks are found through the catalog's ``base_url`` (``trex_serve/local/mock_upstream/``). No Locust
here: the e2e tests import ``run_outage`` and assert on its counts. Exit 1 when the model was not
answering again within ``--bound`` seconds of the heal or failed again after its first answer.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml


@dataclass(frozen=True)
class Reply:
    sent: float
    done: float
    status: int
    code: str | None
    provider: str | None


@dataclass
class OutageResult:
    outage_s: float
    heal_at: float
    replies: list[Reply] = field(default_factory=list)
    # Upstream requests each mock saw while it was down, and during the outage's second half (every
    # circuit long open by then: what probing alone costs a provider that is still down).
    upstream_during: dict[str, int] = field(default_factory=dict)
    upstream_late: dict[str, int] = field(default_factory=dict)
    late_window_s: float = 0.0

    @property
    def first_ok_after_heal_s(self) -> float | None:
        done = [r.done for r in self.replies if r.status == 200 and r.sent >= self.heal_at]
        return min(done) - self.heal_at if done else None

    def after_first_ok(self) -> list[Reply]:
        if self.first_ok_after_heal_s is None:
            return []
        first = self.heal_at + self.first_ok_after_heal_s
        return [r for r in self.replies if r.sent >= first]

    def failures_after_first_ok(self) -> int:
        return sum(1 for r in self.after_first_ok() if r.status != 200)

    def probe_rate(self) -> dict[str, float]:
        """Upstream requests per second against each provider while every circuit was open."""
        return {p: n / self.late_window_s for p, n in self.upstream_late.items()} if self.late_window_s else {}

    def summary(self) -> str:
        first = self.first_ok_after_heal_s
        dark = f"{first:.2f} s" if first is not None else "never"
        during = [r for r in self.replies if self.heal_at - self.outage_s <= r.sent < self.heal_at]
        return (f"outage {self.outage_s:.0f} s, {len(during)} requests during it "
                f"({dict(Counter(r.status for r in during))}); model answering again "
                f"{dark} after the heal; "
                f"{self.failures_after_first_ok()} failures among the {len(self.after_first_ok())} requests "
                f"after the first answer; upstream requests while down {self.upstream_during}, "
                f"in the last {self.late_window_s:.0f} s {self.upstream_late} "
                f"= {', '.join(f'{p} {r:.2f}/s' for p, r in self.probe_rate().items())}")


def _mock_url(base_url: str) -> str:
    url = base_url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def _mock_counts(client: httpx.Client, mocks: dict[str, str]) -> dict[str, int]:
    return {p: int(client.get(f"{url}/_stats").json()["requests"]) for p, url in mocks.items()}


def _new_key(client: httpx.Client, host: str, admin_token: str, plan: str) -> str:
    headers = {"Authorization": f"Bearer {admin_token}"}
    account = client.post(f"{host}/admin/v1/accounts", headers=headers,
                          json={"name": f"outage-{uuid.uuid4().hex[:6]}", "plan": plan})
    account.raise_for_status()
    key = client.post(f"{host}/admin/v1/accounts/{account.json()['id']}/keys", headers=headers,
                      json={"name": "outage"})
    key.raise_for_status()
    return key.json()["key"]


def run_outage(host: str, admin_token: str, catalog_path: str, model: str | None = None, rate: float = 10.0,
               warmup_s: float = 3.0, outage_s: float = 45.0, after_s: float = 10.0, plan: str = "free",
               status: int = 503) -> OutageResult:
    catalog = yaml.safe_load(Path(catalog_path).read_text())
    providers = {p["name"]: p for p in catalog["providers"]}
    models = {m["id"]: m for m in catalog["models"]}
    model = model or next(m for m, spec in models.items() if len(spec.get("candidates") or []) >= 2)
    mocks = {c["provider"]: _mock_url(providers[c["provider"]]["base_url"]) for c in models[model]["candidates"]}
    host = host.rstrip("/")
    control = httpx.Client(timeout=10)
    key = _new_key(control, host, admin_token, plan)
    result = OutageResult(outage_s, 0.0)
    lock = threading.Lock()
    http = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=64))

    def one() -> None:
        sent = time.time()
        try:
            resp = http.post(f"{host}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                             json={"model": model, "messages": [{"role": "user", "content": "outage"}]})
            code = None if resp.status_code == 200 else resp.json().get("error", {}).get("code")
            reply = Reply(sent, time.time(), resp.status_code, code, resp.headers.get("x-trex-upstream-provider"))
        except (httpx.HTTPError, ValueError) as exc:
            reply = Reply(sent, time.time(), 0, type(exc).__name__, None)
        with lock:
            result.replies.append(reply)

    for url in mocks.values():
        control.post(f"{url}/_reset")
    late_from = outage_s / 2
    with ThreadPoolExecutor(max_workers=32) as pool:
        t0 = time.time()
        phase = "warmup"
        counts: dict[str, dict[str, int]] = {}
        n = 0
        while True:
            now = time.time() - t0
            if phase == "warmup" and now >= warmup_s:
                for url in mocks.values():
                    control.post(f"{url}/_control", json={"error_rate": 1.0, "error_status": status})
                counts["down"] = _mock_counts(control, mocks)
                phase = "down"
            elif phase == "down" and now >= warmup_s + late_from:
                counts["late"] = _mock_counts(control, mocks)
                late_at = time.time()
                phase = "late"
            elif phase == "late" and now >= warmup_s + outage_s:
                counts["heal"] = _mock_counts(control, mocks)
                result.late_window_s = time.time() - late_at
                for url in mocks.values():
                    control.post(f"{url}/_reset")
                result.heal_at = time.time()
                phase = "after"
            elif phase == "after" and now >= warmup_s + outage_s + after_s:
                break
            pool.submit(one)
            n += 1
            # Paced against the start, so a slow control call does not lower the rate.
            time.sleep(max(0.0, t0 + n / rate - time.time()))
    result.upstream_during = {p: counts["heal"][p] - counts["down"][p] for p in mocks}
    result.upstream_late = {p: counts["heal"][p] - counts["late"][p] for p in mocks}
    result.replies.sort(key=lambda r: r.sent)
    http.close()
    control.close()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.outage", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default=os.environ.get("TREX_LOADTEST_HOST", "http://127.0.0.1:8000"))
    p.add_argument("--admin-token", default=os.environ.get("TREX_ADMIN_TOKEN"))
    p.add_argument("--catalog", default=os.environ.get("TREX_CATALOG"))
    p.add_argument("--model", default=None, help="default: the catalog's first model with two candidates")
    p.add_argument("--plan", default="free")
    p.add_argument("--rate", type=float, default=10.0, help="requests per second, steady")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--outage", type=float, default=45.0, help="seconds every candidate answers 503")
    p.add_argument("--after", type=float, default=10.0, help="seconds of traffic after the heal")
    p.add_argument("--bound", type=float, default=2.0, help="seconds the model may stay dark after the heal")
    args = p.parse_args(argv)
    if not args.admin_token or not args.catalog:
        print("--admin-token and --catalog (or TREX_ADMIN_TOKEN / TREX_CATALOG) are required", file=sys.stderr)
        return 2
    result = run_outage(args.host, args.admin_token, args.catalog, args.model, args.rate, args.warmup,
                        args.outage, args.after, args.plan)
    print(result.summary())
    first = result.first_ok_after_heal_s
    return 0 if first is not None and first <= args.bound and not result.failures_after_first_ok() else 1


if __name__ == "__main__":
    sys.exit(main())
