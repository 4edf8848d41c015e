"""The other gateways the benchmark runs beside Trex against the same upstream, each optional and
skipped with a note when it is not installed: TensorZero's Rust gateway (PyPI `tensorzero`, whose
Python package starts its HTTP gateway in-process; install it in a venv of its own, its pins are
not ours) — no auth, no limits, no billing, no logs, the fastest gateway that installs here."""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

import httpx

# The child process: start TensorZero's HTTP gateway, print its address, serve until killed.
_TZ_CHILD = """
import sys, time
from tensorzero.tensorzero import _start_http_gateway
gw = _start_http_gateway(config_file=sys.argv[1], clickhouse_url=None, postgres_url=None, valkey_url=None,
                         async_setup=False)
print(gw.base_url, flush=True)
while True:
    time.sleep(3600)
"""
TZ_MODEL = "tensorzero::model_name::mock"


def start_tensorzero(python: str, mock_port: int, body: dict) -> tuple[subprocess.Popen, str, dict] | None:
    """(process, chat completions URL, the body with TensorZero's model name), or None with a note."""
    check = subprocess.run([python, "-c", "import tensorzero"], capture_output=True, text=True)
    if check.returncode != 0:
        print(f"TensorZero is not installed for {python} (pip install tensorzero): skipped")
        return None
    config = Path(tempfile.mkdtemp(prefix="trex-bench-tz-")) / "tensorzero.toml"
    # The same mock upstream as every other row, as an OpenAI-compatible provider without a key.
    config.write_text(f"""
[models.mock]
routing = ["mock"]

[models.mock.providers.mock]
type = "openai"
api_base = "http://127.0.0.1:{mock_port}/v1/"
model_name = "gpt-4o-mini"
api_key_location = "none"
""")
    proc = subprocess.Popen([python, "-c", _TZ_CHILD, str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    base = ""
    for line in proc.stdout or ():  # its own log lines come first on the same stream
        if line.startswith("http"):
            base = line.strip()
            break
    url = f"{base.rstrip('/')}/chat/completions"
    tz_body = {**body, "model": TZ_MODEL}
    deadline = time.time() + 30
    status, text = 0, "did not start"
    while time.time() < deadline and base:
        try:
            r = httpx.post(url, json=tz_body, timeout=10)
            status, text = r.status_code, r.text
            if status == 200:
                return proc, url, tz_body
        except httpx.HTTPError as exc:
            status, text = 0, str(exc)
        time.sleep(0.2)
    proc.kill()
    print(f"TensorZero's gateway answered {status}: {text[:200]}: skipped")
    return None
