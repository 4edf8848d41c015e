"""Per-stage timing of the data path, for the latency budget in docs/BENCHMARKS.md. Off unless
TREX_STAGE_PROBE names a folder: then, at import in each ingress and pool replica, the hot path's
calls are wrapped with timers (a few microseconds each) and every 2 s the replica writes each
stage's count, p50 and mean in ms to ``<folder>/stages-<pid>.json``. Never on in production."""

from __future__ import annotations

import functools
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

STAGES: dict[str, list[float]] = {}


def _add(name: str, seconds: float) -> None:
    samples = STAGES.setdefault(name, [])
    samples.append(seconds * 1000)
    if len(samples) > 20000:
        del samples[:10000]


def _wrap_async(cls: Any, attr: str, name: str) -> None:
    orig = getattr(cls, attr)

    @functools.wraps(orig)
    async def timed(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return await orig(*a, **k)
        finally:
            _add(name, time.perf_counter() - t)

    setattr(cls, attr, timed)


def _writer(folder: Path) -> None:
    while True:
        time.sleep(2)
        out = {k: {"n": len(v), "p50_ms": round(statistics.median(v), 4), "mean_ms": round(statistics.fmean(v), 4)}
               for k, v in list(STAGES.items()) if v}
        (folder / f"stages-{os.getpid()}.json").write_text(json.dumps(out, indent=1))


def _start(folder: str) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    threading.Thread(target=_writer, args=(Path(folder),), daemon=True).start()


def install_ingress() -> None:
    folder = os.environ.get("TREX_STAGE_PROBE")
    if not folder:
        return
    from fastapi import FastAPI

    from trex_serve.admission.counters import CounterStore
    from trex_serve.admission.keygate import KeyGate
    from trex_serve.hop.relay import HttpRelay
    from trex_serve.pipeline.request_path import Pipeline
    from trex_serve.runtime import Runtime
    from trex_serve.web.data_server import DataServer

    _wrap_async(DataServer, "_handle", "data server handler (first byte in .. answer written)")
    _wrap_async(KeyGate, "authenticate", "auth")
    _wrap_async(KeyGate, "admit", "admit (Lua)")
    _wrap_async(KeyGate, "settle", "settle (Lua; after the answer since 33b7375)")
    _wrap_async(CounterStore, "admit", "admit: the counter store's round trip")
    _wrap_async(Pipeline, "_routes", "routes + provider keys")
    _wrap_async(Pipeline, "_settle_before_answer", "settlement written (before the answer)")
    _wrap_async(Pipeline, "chat", "pipeline.chat")
    _wrap_async(Pipeline, "_front", "parse + validate + auth + resolve")
    _wrap_async(HttpRelay, "__call__", "relay (choice + hop + pool + upstream)")
    record = Runtime.record

    def timed_record(self: Any, rec: Any) -> None:
        t = time.perf_counter()
        record(self, rec)
        _add("record (log row + metrics)", time.perf_counter() - t)

    Runtime.record = timed_record  # type: ignore[method-assign]
    relay_init = HttpRelay.__init__

    def init(self: Any, pick: Any, *a: Any, **k: Any) -> None:
        async def timed_pick(provider: str, exclude: set) -> Any:
            t = time.perf_counter()
            try:
                return await pick(provider, exclude)
            finally:
                _add("replica choice", time.perf_counter() - t)

        relay_init(self, timed_pick, *a, **k)

    HttpRelay.__init__ = init  # type: ignore[method-assign]
    app_call = FastAPI.__call__

    async def call(self: Any, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await app_call(self, scope, receive, send)
        t = time.perf_counter()

        async def timed_send(msg: dict) -> None:
            if msg["type"] == "http.response.body" and not msg.get("more_body"):
                _add("ASGI app (FastAPI in .. last byte out)", time.perf_counter() - t)
            await send(msg)

        await app_call(self, scope, receive, timed_send)

    FastAPI.__call__ = call  # type: ignore[method-assign]
    _start(folder)


def install_pool() -> None:
    folder = os.environ.get("TREX_STAGE_PROBE")
    if not folder:
        return
    from trex_serve.hop.pool_server import PoolServer

    _wrap_async(PoolServer, "relay", "pool server handler (incl. upstream)")
    _wrap_async(PoolServer, "_whole", "pool: read upstream body + translate")
    _start(folder)
