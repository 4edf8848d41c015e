"""What tracing costs the request path, off and on (short runs; nothing here is a test).

    .venv/bin/python scripts/bench_tracing.py [--requests 1500] [--hooks 100000]

1. The hooks alone: one request's worth of tracing calls (begin, admission, two attempts,
   settlement, finish) on a bare call object, per request, with tracing off and on.
2. The in-process data path (HTTP app → pipeline → relay hop → pool server → mock upstream, as
   tests/fakes.py builds it), sequential requests, mean and p50 per request, off and on.
"On" is the production set-up: the SDK, a BatchSpanProcessor and the OTLP/HTTP exporter sending to
a local receiver in another process (tests/otlp_receiver.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fakes import data_path_client  # noqa: E402
from tests.helpers import MockProcess, write_catalog  # noqa: E402
from trex_serve.catalog import load_catalog  # noqa: E402
from trex_serve.hop.contract import HopRequest  # noqa: E402
from trex_serve.local.embedded import free_port, port_open  # noqa: E402
from trex_serve.observability import tracing  # noqa: E402
from trex_serve.observability.request_record import RequestRecord  # noqa: E402

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "benchmark"}]}


def one_request_bare(rec: RequestRecord) -> None:
    """The same objects as below without the tracing calls: the harness's own cost, subtracted."""
    call = SimpleNamespace(api="chat", client_ip="127.0.0.1", request_id="req_x", trace=None, ticket=None,
                           stream=False, attempts=[])
    for provider, status, error in (("alpha", 503, "http_503"), ("beta", 200, None)):
        HopRequest("req_x", provider, "m", "chat", False, False, b"")
        call.attempts.append({"provider": provider, "model": "m", "status": status, "error": error})


def one_request_of_hooks(rec: RequestRecord) -> None:
    call = SimpleNamespace(api="chat", client_ip="127.0.0.1", request_id="req_x", trace=None, ticket=None,
                           stream=False, attempts=[])
    tracing.begin(call, None)
    with tracing.step(call, "trex.admission"):
        pass
    for provider, status, error in (("alpha", 503, "http_503"), ("beta", 200, None)):
        req = HopRequest("req_x", provider, "m", "chat", False, False, b"")
        tracing.attempt_begin(call, provider, "m", req)
        call.attempts.append({"provider": provider, "model": "m", "status": status, "error": error})
        tracing.attempt_end(call)
    with tracing.step(call, "trex.settlement"):
        pass
    tracing.finish(call, rec)


def bench_hooks(n: int, fn=one_request_of_hooks) -> float:
    rec = RequestRecord(request_id="req_x", api="chat", account_id="a", key_id="k", key_prefix="p",
                        model_requested="gpt-4o-mini", provider="beta", model_served="m", attempts=2, fallbacks=1,
                        status=200, error_code=None, latency_ms=1.0, ttfb_ms=1.0, tokens_in=4, tokens_out=7,
                        billing="quota", credits_charged=0, stream=False, client_ip="127.0.0.1", attempt_detail=[])
    t0 = time.perf_counter()
    for _ in range(n):
        fn(rec)
    return (time.perf_counter() - t0) / n * 1e6


async def bench_path(catalog_path: Path, n: int) -> tuple[float, float]:
    async with data_path_client(load_catalog(catalog_path)) as client:
        for _ in range(50):  # warm the connections
            await client.post("/v1/chat/completions", json=BODY)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            r = await client.post("/v1/chat/completions", json=BODY)
            times.append((time.perf_counter() - t0) * 1000)
            assert r.status_code == 200, r.text
    return statistics.mean(times), statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--hooks", type=int, default=100_000)
    args = ap.parse_args()
    # The receiver runs in its own process, as a collector would: its decoding is not measured.
    port = free_port()
    received = tempfile.NamedTemporaryFile("w+", suffix=".jsonl")
    receiver = subprocess.Popen([sys.executable, "-m", "tests.otlp_receiver", "--port", str(port)],
                                stdout=received, stderr=subprocess.DEVNULL, cwd=ROOT)
    endpoint = f"http://127.0.0.1:{port}"
    while not port_open("127.0.0.1", port):
        time.sleep(0.05)
    mocks = {"alpha": MockProcess("alpha"), "beta": MockProcess("beta")}
    catalog = write_catalog(Path(tempfile.mkdtemp()) / "catalog.yaml", mocks)
    results = {}
    try:
        for mode in ("off", "on", "on, 10%", "off again"):
            tracing.use(None)
            if mode.startswith("on"):
                os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
                if mode == "on, 10%":  # head sampling as the SDK defines it, on a fresh trace per request
                    os.environ["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
                    os.environ["OTEL_TRACES_SAMPLER_ARG"] = "0.1"
                assert tracing.setup("bench")
            # With tracing on, few enough requests that the batch queue (2,048 spans) never overflows.
            n = args.hooks if mode.startswith("off") else 250
            hooks = bench_hooks(n) - bench_hooks(n, one_request_bare)
            tracing.flush()
            mean, p50 = asyncio.run(bench_path(catalog, args.requests))
            tracing.flush()
            for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"):
                os.environ.pop(var, None)
            results[mode] = (hooks, mean, p50)
    finally:
        for m in mocks.values():
            m.stop()
        receiver.kill()
        receiver.wait()
    print(f"{'tracing':<10} {'hooks/request':>14} {'path mean':>10} {'path p50':>9}")
    for mode, (hooks, mean, p50) in results.items():
        print(f"{mode:<10} {hooks:>11.2f} µs {mean:>7.3f} ms {p50:>6.3f} ms")
    received.seek(0)
    spans = sum(1 for line in received if line.startswith("{"))
    print(f"spans received by the OTLP receiver: {spans}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
