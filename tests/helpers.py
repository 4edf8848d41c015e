"""Test helpers: mock upstream processes and a catalog pointing at them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from trex_serve.local.embedded import free_port, port_open


class MockProcess:
    """A mock upstream in its own process, as in production: real HTTP, real sockets."""

    def __init__(self, name: str, port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trex_serve.local.mock_upstream", "--port", str(self.port), "--name", name],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not port_open("127.0.0.1", self.port):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"mock upstream {name} did not start")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def control(self, **faults) -> dict:
        return httpx.post(f"{self.url}/_control", json=faults, timeout=5).json()

    def reset(self) -> None:
        httpx.post(f"{self.url}/_reset", timeout=5)

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/_stats", timeout=5).json()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def write_catalog(path: Path, mocks: dict[str, MockProcess], extra: str = "") -> Path:
    """Two providers serving the same standard model, a premium model, smart-auto and a plan."""
    a, b = mocks["alpha"], mocks["beta"]
    path.write_text(f"""
providers:
  - name: alpha
    base_url: {a.url}/v1
    format: openai
    auth: none
    timeout_s: 2
    first_byte_timeout_s: 1.5
    connect_timeout_s: 1
  - name: beta
    base_url: {b.url}/v1
    format: openai
    auth: none
    timeout_s: 2
    first_byte_timeout_s: 1.5
    connect_timeout_s: 1
  - name: byok
    base_url: {a.url}/v1
    format: openai
    api_key_env: TREX_TEST_UNSET_PROVIDER_KEY
  - name: keyless
    base_url: {a.url}/v1
    format: openai
  - name: claude
    base_url: {a.url}/v1
    format: anthropic
    auth: none
    timeout_s: 2
    first_byte_timeout_s: 1.5
  - name: native
    base_url: {b.url}/v1
    format: openai
    auth: none
    supports_responses: true
    timeout_s: 2
models:
  - id: gpt-4o-mini
    tier: standard
    context_window: 128000
    price: {{input_per_mtok: 0.15, output_per_mtok: 0.60}}
    candidates:
      - {{provider: alpha, model: alpha-mini}}
      - {{provider: beta, model: beta-mini}}
  - id: big-model
    tier: premium
    price: {{input_per_mtok: 5.0, output_per_mtok: 15.0}}
    candidates:
      - {{provider: alpha, model: alpha-big}}
      - {{provider: beta, model: beta-big}}
  - id: byok-model
    candidates:
      - {{provider: byok, model: byok-upstream}}
  - id: keyless-model
    candidates:
      - {{provider: keyless, model: keyless-upstream}}
  - id: claude-sonnet
    tier: standard
    price: {{input_per_mtok: 3.0, output_per_mtok: 15.0}}
    candidates:
      - {{provider: claude, model: claude-sonnet-4-5}}
      - {{provider: beta, model: beta-mini}}
  - id: cached-model
    tier: premium
    price: {{input_per_mtok: 2.0, output_per_mtok: 8.0, cache_read_per_mtok: 0.5}}
    candidates:
      - {{provider: alpha, model: alpha-cached}}
  - id: cached-claude
    tier: premium
    price: {{input_per_mtok: 3.0, output_per_mtok: 15.0, cache_read_per_mtok: 0.30,
             cache_write_per_mtok: 3.75, cache_write_1h_per_mtok: 6.0}}
    candidates:
      - {{provider: claude, model: claude-sonnet-4-5}}
  - id: native-model
    candidates:
      - {{provider: native, model: native-upstream}}
  - id: reject-me
    candidates:
      - {{provider: alpha, model: reject-me}}
smart_auto: [gpt-4o-mini]
aliases:
  "claude-sonnet-4-*": claude-sonnet
  "claude-opus-*": claude-sonnet
  haiku: gpt-4o-mini
  "claude-*haiku*": gpt-4o-mini
plans:
  - name: free
    rpm: 1000
    tpm: 10000000
    concurrency: 50
    burst_concurrency: 60
    daily_quota: {{requests: 100000, tokens: 100000000}}
    long_context_tokens: 32000
    premium: true
{extra}
""")
    return path


_RUNNING = """
import json, sys, ray
from ray import serve
ray.init(address="127.0.0.1:" + sys.argv[1], logging_level="ERROR", log_to_driver=False)
deps = serve.status().applications["trex"].deployments
print(json.dumps({name: d.replica_states.get("RUNNING", 0) for name, d in deps.items()}))
"""


def running_replicas(ray_port: str) -> dict[str, int]:
    """Running replicas per deployment of the gateway on this Ray port, asked from a separate driver."""
    out = subprocess.run([sys.executable, "-c", _RUNNING, ray_port], capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout.strip().splitlines()[-1])
