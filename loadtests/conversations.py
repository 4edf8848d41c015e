"""Suite ``conversations``: Responses that continue with ``previous_response_id``, under load.

Each user holds a conversation of ``--turns`` turns (then starts a new one): its first turn plain,
every later turn continuing the last answer by id, whole or streamed, the model alternating between
the standard model (openai-format providers) and the catalog's anthropic-format model when it has
one, so a chain crosses formats. A share of the users also repeat one identical cached request
(``trex.cache``). Checked:

- zero failures; every continued answer echoes the ``previous_response_id`` it was sent, and has
  an id of its own;
- the gateway sends the whole history: within a chain, the prompt tokens billed at a turn exceed
  those of the chain's first turn;
- chains reached their full length, and the last answer of a sample of chains is retrievable
  (``GET /v1/responses/{id}``) with its input items;
- cached requests: every one sent after the first answer of its kind (whole or streamed) is
  ``X-Trex-Cache: hit``.

Kept in its own module as ``redis_failover`` is; the runner (run.py) hands it the harness module."""

from __future__ import annotations

import json
import random
import time
from types import ModuleType
from typing import Any

import requests

from loadtests.common import TREX_HEADERS, Record


def respond(user: Any, model: str, text: str, previous: str | None, stream: bool,
            cache_ttl: int = 0, name: str | None = None) -> tuple[Record, dict[str, Any] | None]:
    """One ``/v1/responses`` call: the record and the response object (the whole body, or the
    stream's ``response.completed``)."""
    body: dict[str, Any] = {"model": model, "input": text, "max_output_tokens": 64, "stream": stream}
    if previous:
        body["previous_response_id"] = previous
    if cache_ttl:
        body["trex"] = {"cache": {"ttl_s": cache_ttl}}
    rec = Record(name or f"responses {model}", model, stream, user.key_index, time.time())
    t0 = time.perf_counter()
    response: dict[str, Any] | None = None
    length = 0
    try:
        resp = user.session.post(f"{user.host}/v1/responses", data=json.dumps(body), headers=user._headers(None),
                                 timeout=user.request_timeout_s)
        rec.ttfb_ms = resp.elapsed.total_seconds() * 1000
        rec.status = resp.status_code
        rec.headers = {h: resp.headers[h] for h in (*TREX_HEADERS, "x-trex-cache") if h in resp.headers}
        length = len(resp.content)
        if resp.status_code != 200:
            rec.error = (resp.json() or {}).get("error")
        elif stream:
            for line in resp.content.split(b"\n"):
                if line.startswith(b"data:"):
                    event = json.loads(line[5:])
                    if event.get("type") == "response.completed":
                        response = event.get("response")
            if response is None:
                rec.exception = "stream ended without response.completed"
        else:
            response = resp.json()
        if response is not None:
            usage = response.get("usage") or {}
            rec.usage = {"prompt_tokens": int(usage.get("input_tokens") or 0),
                         "completion_tokens": int(usage.get("output_tokens") or 0),
                         "total_tokens": int(usage.get("total_tokens") or 0)}
    except (requests.RequestException, ValueError) as err:
        rec.exception = f"{type(err).__name__}: {err}"[:300]
    rec.ended = rec.started + (time.perf_counter() - t0)
    user._fire(rec, length)
    return rec, response


def suite_class(harness: ModuleType) -> type:
    class Conversations(harness.Suite):  # type: ignore[name-defined]
        def prepare(self) -> Any:
            ctx, args = self.ctx, self.args
            self.native = ctx.catalog.anthropic_model()
            ctx.new_account(max(1, args.users), credits=50)
            self.chains: list[list[tuple[Record, dict[str, Any] | None, str | None]]] = []
            self.cached: list[Record] = []
            models = [ctx.standard] + ([self.native] if self.native else [])
            turns, chains, cached = max(2, args.turns), self.chains, self.cached
            prompt = f"cached question {time.time_ns()}"  # one entry per run, shared by the account's keys

            def task(u: Any) -> None:
                if u.user_index % 4 == 3 and random.random() < 0.3:
                    rec, _ = respond(u, ctx.standard, prompt, None, random.random() < 0.5, cache_ttl=600,
                                     name="responses cached")
                    cached.append(rec)
                    return
                if getattr(u, "chain", None) is None or len(u.chain) >= turns:
                    u.chain = []
                    chains.append(u.chain)
                previous = u.chain[-1][1]["id"] if u.chain and u.chain[-1][1] else None
                if u.chain and previous is None:  # the last turn failed: this chain ends here
                    u.chain = []
                    chains.append(u.chain)
                model = models[(len(u.chain) + u.user_index) % len(models)]
                rec, response = respond(u, model, f"turn {len(u.chain) + 1}: tell me more", previous,
                                        random.random() < 0.5)
                u.chain.append((rec, response, previous))
            return harness.user_class(ctx, "ConversationUser", task)

        def check(self, recs: list[Record]) -> None:
            ctx = self.ctx
            self.all_ok(recs, "conversations")
            turns = [t for chain in self.chains for t in chain]
            continued = [(r, resp, prev) for r, resp, prev in turns if prev and r.status == 200]
            wrong = [(prev, (resp or {}).get("previous_response_id")) for _r, resp, prev in continued
                     if (resp or {}).get("previous_response_id") != prev or not (resp or {}).get("id")]
            ctx.check(bool(continued), "conversations: no turn continued a previous response")
            ctx.check(not wrong, f"conversations: {len(wrong)} answers do not echo their previous_response_id, "
                      f"e.g. {wrong[:2]}")
            full = [c for c in self.chains if len(c) >= max(2, self.args.turns)]
            ctx.check(bool(full), f"conversations: no chain reached {self.args.turns} turns")
            shrunk = [c for c in full if all(r.usage for r, _, _ in c)
                      and c[-1][0].usage["prompt_tokens"] <= c[0][0].usage["prompt_tokens"]]
            ctx.check(not shrunk, f"conversations: {len(shrunk)} chains whose last turn billed no more prompt "
                      "tokens than their first (the history was not sent)")
            self._retrievable(full[:5])
            # A whole answer and a stream are different entries; a request sent before the first
            # answer of its kind was finished (and so cached) may miss too.
            hits, misses = [], []
            for stream in (False, True):
                kind = [r for r in self.cached if r.stream == stream and r.status == 200]
                cached_at = min((r.ended for r in kind), default=0.0)
                later = [r for r in kind if r.started > cached_at]
                hits += later
                misses += [r for r in later if r.headers.get("x-trex-cache") != "hit"]
            ctx.check(not misses, f"conversations: {len(misses)} of {len(hits)} repeated cached requests "
                      "were not hits")
            depth = max((len(c) for c in self.chains), default=0)
            ctx.notes.append(f"conversations: {len(self.chains)} chains (longest {depth} turns, "
                             f"{len(continued)} continued turns), {len(self.cached)} cached requests "
                             f"({len(hits) - len(misses)} hits); models {sorted({r.model for r in recs})}")

        def _retrievable(self, chains: list[list[tuple[Record, dict[str, Any] | None, str | None]]]) -> None:
            key = self.ctx.keys[0]["key"]
            for chain in chains:
                last = chain[-1][1] or {}
                rid = last.get("id")
                got = requests.get(f"{self.args.host}/v1/responses/{rid}", timeout=10,
                                   headers={"Authorization": f"Bearer {key}"})
                items = requests.get(f"{self.args.host}/v1/responses/{rid}/input_items", timeout=10,
                                     headers={"Authorization": f"Bearer {key}"})
                self.ctx.check(got.status_code == 200 and got.json().get("id") == rid,
                               f"conversations: stored response {rid} not retrievable ({got.status_code})")
                self.ctx.check(items.status_code == 200 and bool(items.json().get("data")),
                               f"conversations: input items of {rid}: {items.status_code}")

    return Conversations
