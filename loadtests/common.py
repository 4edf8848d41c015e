"""Shared pieces of the load-test suites: an OpenAI-shaped Locust user that records what the gateway
answered (status, Trex headers, usage, error envelope, latency and time to first byte), a recorder the
suites assert on, and a small operator-API client.

The user talks HTTP itself (a plain ``requests`` session, gevent-patched by Locust) and reports each
request to Locust's statistics with its full duration, so stream latency means "until [DONE]", and
TTFB means "until the first SSE data line" (non-stream: until the response headers)."""

from __future__ import annotations

import json
import math
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import requests
from locust import User, constant

TREX_HEADERS = ("x-trex-request-id", "x-trex-upstream-provider", "x-trex-upstream-model", "x-trex-attempts",
                "x-trex-billing", "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests", "retry-after")


@dataclass
class Record:
    """One request as the client saw it."""

    name: str
    model: str
    stream: bool
    key_index: int
    started: float               # wall clock (time.time()) when the request was sent
    ended: float = 0.0
    ttfb_ms: float | None = None
    status: int | None = None    # None: no HTTP answer at all (connection error, client timeout)
    headers: dict[str, str] = field(default_factory=dict)
    usage: dict[str, int] | None = None
    error: dict[str, Any] | None = None  # the OpenAI envelope's "error" object, when there was one
    exception: str | None = None  # transport problem or a broken body/stream
    text: str = ""
    aborted: bool = False        # the client stopped reading the stream on purpose

    @property
    def latency_ms(self) -> float:
        return (self.ended - self.started) * 1000

    @property
    def attempts(self) -> int:
        try:
            return int(self.headers.get("x-trex-attempts", "0"))
        except ValueError:
            return 0

    @property
    def provider(self) -> str | None:
        return self.headers.get("x-trex-upstream-provider")

    def envelope_ok(self) -> bool:
        """An error answer in the OpenAI envelope: error.message/type/code present."""
        e = self.error
        return bool(isinstance(e, dict) and e.get("message") and e.get("type") and e.get("code"))


class Recorder:
    """Every request of a run, in order; thread/greenlet safe."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self._lock = threading.Lock()

    def add(self, rec: Record) -> None:
        with self._lock:
            self.records.append(rec)

    def clear(self) -> None:
        with self._lock:
            self.records = []


RECORDER = Recorder()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    idx = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[idx]


class TrexUser(User):
    """An OpenAI-shaped client of the gateway. Suites subclass it and set the class attributes:

    - ``keys``: the Trex API keys to use (each user picks one: ``key_for_user``),
    - ``ok_statuses``: statuses that are not a failure in Locust's statistics (200 always is),
    - ``request_timeout_s``: the client's bound (a request over it counts as hung).
    """

    abstract = True
    wait_time = constant(0)
    keys: list[str] = []
    ok_statuses: frozenset[int] = frozenset()
    request_timeout_s: float = 15.0
    recorder: Recorder = RECORDER
    _counter = 0

    def __init__(self, environment) -> None:
        super().__init__(environment)
        type(self)._counter += 1
        self.user_index = type(self)._counter - 1
        self.session = requests.Session()
        self.key_index = self.user_index % max(1, len(self.keys))

    def on_stop(self) -> None:
        self.session.close()

    # ---------------------------------------------------------------- requests

    def _headers(self, key_index: int | None) -> dict[str, str]:
        idx = self.key_index if key_index is None else key_index
        return {"Authorization": f"Bearer {self.keys[idx]}", "Content-Type": "application/json"}

    def _fire(self, rec: Record, length: int) -> None:
        self.recorder.add(rec)
        exc: Exception | None = None
        if rec.exception:
            exc = RuntimeError(rec.exception)
        elif rec.status != 200 and rec.status not in self.ok_statuses:
            code = (rec.error or {}).get("code")
            exc = RuntimeError(f"HTTP {rec.status} {code}")
        self.environment.events.request.fire(
            request_type="STREAM" if rec.stream else "POST", name=rec.name, response_time=rec.latency_ms,
            response_length=length, exception=exc, context={}, response=None)

    def chat(self, model: str, content: str = "hello", max_tokens: int = 64, key_index: int | None = None,
             name: str | None = None, extra: dict[str, Any] | None = None) -> Record:
        """Non-streaming chat completion."""
        body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                **(extra or {})}
        rec = Record(name or f"chat {model}", model, False,
                     self.key_index if key_index is None else key_index, time.time())
        t0 = time.perf_counter()
        length = 0
        try:
            resp = self.session.post(f"{self.host}/v1/chat/completions", data=json.dumps(body),
                                     headers=self._headers(key_index), timeout=self.request_timeout_s)
            rec.ttfb_ms = resp.elapsed.total_seconds() * 1000
            rec.status = resp.status_code
            rec.headers = {h: resp.headers[h] for h in TREX_HEADERS if h in resp.headers}
            length = len(resp.content)
            try:
                payload = resp.json()
            except ValueError:
                payload = None
                rec.exception = f"HTTP {resp.status_code} with a body that is not JSON: {resp.text[:120]!r}"
            if isinstance(payload, dict):
                if resp.status_code == 200:
                    rec.usage = payload.get("usage")
                    try:
                        rec.text = payload["choices"][0]["message"]["content"] or ""
                    except (KeyError, IndexError, TypeError):
                        rec.exception = "200 without choices[0].message.content"
                else:
                    rec.error = payload.get("error") if isinstance(payload.get("error"), dict) else None
        except requests.RequestException as err:
            rec.exception = f"{type(err).__name__}: {err}"[:300]
        rec.ended = rec.started + (time.perf_counter() - t0)
        self._fire(rec, length)
        return rec

    def chat_stream(self, model: str, content: str = "hello", max_tokens: int = 64, key_index: int | None = None,
                    name: str | None = None, abort_after_chunks: int | None = None,
                    extra: dict[str, Any] | None = None) -> Record:
        """Streaming chat completion with ``stream_options.include_usage``. TTFB = first data line.
        ``abort_after_chunks`` closes the connection early (a client walking away)."""
        body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
        rec = Record(name or f"stream {model}", model, True,
                     self.key_index if key_index is None else key_index, time.time())
        t0 = time.perf_counter()
        length = 0
        try:
            with self.session.post(f"{self.host}/v1/chat/completions", data=json.dumps(body), stream=True,
                                   headers=self._headers(key_index), timeout=self.request_timeout_s) as resp:
                rec.status = resp.status_code
                rec.headers = {h: resp.headers[h] for h in TREX_HEADERS if h in resp.headers}
                if resp.status_code != 200:
                    rec.ttfb_ms = (time.perf_counter() - t0) * 1000
                    raw = resp.content
                    length = len(raw)
                    try:
                        payload = json.loads(raw)
                        rec.error = payload.get("error") if isinstance(payload, dict) else None
                    except ValueError:
                        rec.exception = f"HTTP {resp.status_code} with a body that is not JSON: {raw[:120]!r}"
                else:
                    done, chunks = False, 0
                    for line in resp.iter_lines():
                        if not line:
                            continue
                        length += len(line)
                        if rec.ttfb_ms is None:
                            rec.ttfb_ms = (time.perf_counter() - t0) * 1000
                        if not line.startswith(b"data:"):
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            done = True
                            break
                        event = json.loads(data)
                        if isinstance(event, dict) and "error" in event:
                            rec.error = event["error"]
                            rec.exception = f"error event mid-stream: {event['error'].get('code')}"
                            break
                        if event.get("usage"):
                            rec.usage = event["usage"]
                        for choice in event.get("choices") or []:
                            rec.text += (choice.get("delta") or {}).get("content") or ""
                        chunks += 1
                        if abort_after_chunks is not None and chunks >= abort_after_chunks:
                            rec.aborted = True
                            break
                    if not done and not rec.aborted and rec.exception is None:
                        rec.exception = "stream ended without data: [DONE]"
        except (requests.RequestException, ValueError) as err:
            rec.exception = f"{type(err).__name__}: {err}"[:300]
        rec.ended = rec.started + (time.perf_counter() - t0)
        self._fire(rec, length)
        return rec

    def messages(self, model: str, content: str = "hello", max_tokens: int = 64, stream: bool = False,
                 name: str | None = None) -> Record:
        """Anthropic's Messages API (``/v1/messages``, key in ``x-api-key``), whole or streamed. The
        record's usage is put in OpenAI's fields, the shape the suites' checks read."""
        body = {"model": model, "max_tokens": max_tokens, "stream": stream,
                "messages": [{"role": "user", "content": content}]}
        rec = Record(name or f"messages {model}", model, stream, self.key_index, time.time())
        t0 = time.perf_counter()
        length = 0
        headers = {"x-api-key": self.keys[self.key_index], "anthropic-version": "2023-06-01",
                   "Content-Type": "application/json"}
        try:
            resp = self.session.post(f"{self.host}/v1/messages", data=json.dumps(body), headers=headers,
                                     timeout=self.request_timeout_s)
            rec.ttfb_ms = resp.elapsed.total_seconds() * 1000
            rec.status = resp.status_code
            rec.headers = {h: resp.headers[h] for h in TREX_HEADERS if h in resp.headers}
            length = len(resp.content)
            usage: dict[str, Any] = {}
            if resp.status_code != 200:
                payload = resp.json()
                rec.error = {"code": (payload.get("error") or {}).get("type"), **(payload.get("error") or {})}
            elif stream:
                for line in resp.content.split(b"\n"):
                    if line.startswith(b"data:"):
                        event = json.loads(line[5:])
                        usage.update((event.get("message") or {}).get("usage") or event.get("usage") or {})
                        rec.text += (event.get("delta") or {}).get("text") or ""
                if b"message_stop" not in resp.content:
                    rec.exception = "stream ended without message_stop"
            else:
                payload = resp.json()
                usage = payload.get("usage") or {}
                rec.text = "".join(b.get("text") or "" for b in payload.get("content") or [])
            if usage:
                prompt = sum(int(usage.get(k) or 0) for k in ("input_tokens", "cache_read_input_tokens",
                                                              "cache_creation_input_tokens"))
                rec.usage = {"prompt_tokens": prompt, "completion_tokens": int(usage.get("output_tokens") or 0),
                             "total_tokens": prompt + int(usage.get("output_tokens") or 0)}
        except (requests.RequestException, ValueError) as err:
            rec.exception = f"{type(err).__name__}: {err}"[:300]
        rec.ended = rec.started + (time.perf_counter() - t0)
        self._fire(rec, length)
        return rec

    def mixed(self, model: str, stream_share: float = 0.5, **kw: Any) -> Record:
        if random.random() < stream_share:
            return self.chat_stream(model, **kw)
        return self.chat(model, **kw)


class Admin:
    """The operator API (``/admin/v1``)."""

    def __init__(self, base: str, token: str, timeout: float = 30) -> None:
        self.base = base.rstrip("/") + "/admin/v1"
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        resp = self.session.request(method, self.base + path, json=body, timeout=self.timeout)
        if resp.status_code >= 300:
            raise RuntimeError(f"{method} /admin/v1{path} -> {resp.status_code}: {resp.text[:300]}")
        return resp.json()

    def create_account(self, name: str, plan: str = "free") -> dict:
        return self._call("POST", "/accounts", {"name": name, "plan": plan})

    def create_key(self, account_id: str, name: str, limits: dict | None = None) -> dict:
        body: dict[str, Any] = {"name": name}
        if limits:
            body["limits"] = limits
        return self._call("POST", f"/accounts/{account_id}/keys", body)

    def grant(self, account_id: str, amount: float, reason: str = "load test") -> dict:
        return self._call("POST", f"/accounts/{account_id}/credits", {"amount": amount, "reason": reason})

    def usage(self, account_id: str) -> dict:
        return self._call("GET", f"/accounts/{account_id}/usage")


class Mock:
    """A mock upstream's control endpoint (``trex_serve.local.mock_upstream``)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]

    def control(self, **faults: Any) -> dict:
        resp = requests.post(f"{self.url}/_control", json=faults, timeout=5)
        resp.raise_for_status()
        return resp.json()

    def reset(self) -> None:
        requests.post(f"{self.url}/_reset", timeout=5).raise_for_status()

    def stats(self) -> dict:
        return requests.get(f"{self.url}/_stats", timeout=5).json()
