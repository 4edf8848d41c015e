"""The coding agents teams put through their gateway, run headless as their users run them, against
the real Serve app with mock upstreams: Claude Code (`claude -p`, Anthropic's Messages API) on an
anthropic-format and an openai-format route, and with its own default model name (a catalog alias),
and Codex (`codex exec`, the Responses API). Installed from npm into a cache under the temp dir reused
across runs (`TREX_AGENT_CLIENTS_DIR` to move it; the install is bounded by a timeout); skipped only
when npm cannot install them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

CACHE = Path(os.environ.get("TREX_AGENT_CLIENTS_DIR", Path(tempfile.gettempdir()) / "trex-agent-clients"))
NPM_INSTALL_TIMEOUT_S = 600
PACKAGES = ("@anthropic-ai/claude-code", "@openai/codex")


@pytest.fixture(scope="module")
def bin_dir() -> Path:
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: the agent clients cannot be installed")
    bins = CACHE / "node_modules" / ".bin"
    if not ((bins / "claude").exists() and (bins / "codex").exists()):
        CACHE.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(CACHE), *PACKAGES],
                                  capture_output=True, text=True, timeout=NPM_INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.skip("npm install of the agent clients timed out")
        if done.returncode != 0:
            pytest.skip(f"npm could not install {PACKAGES}: {done.stderr[-300:]}")
    return bins


def _home(tmp_path: Path) -> dict[str, str]:
    # A home of their own: no user settings, no login, no telemetry leaving the machine.
    return {**os.environ, "HOME": str(tmp_path), "DISABLE_TELEMETRY": "1",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1"}


def _claude(bin_dir: Path, gateway: dict, tmp_path: Path, model: str | None) -> dict:
    env = {**_home(tmp_path), "ANTHROPIC_BASE_URL": gateway["base"], "ANTHROPIC_API_KEY": gateway["key"]}
    if model is not None:  # None: the names Claude Code picks itself, which the catalog's aliases map
        env.update(ANTHROPIC_MODEL=model, ANTHROPIC_SMALL_FAST_MODEL=model)
    done = subprocess.run([str(bin_dir / "claude"), "-p", "say hello", "--output-format", "json"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("model", "mock_path"), [("claude-sonnet", "claude"), ("gpt-4o-mini", "alpha"),
                                                   (None, "claude")])
def test_claude_code_answers_through_the_gateway(bin_dir, gateway, tmp_path, model, mock_path):
    for m in gateway["mocks"].values():
        m.reset()
    result = _claude(bin_dir, gateway, tmp_path, model)
    assert result["subtype"] == "success" and not result["is_error"], result
    assert result["result"].startswith("Hello from alpha")
    sent = gateway["mocks"]["alpha"].stats()["last_body"]
    assert len(sent["tools"]) >= 10  # Claude Code's tools reached the provider (translated or not)
    if mock_path == "claude":  # anthropic-format: Claude Code's own body, its system blocks untouched
        assert isinstance(sent["system"], list) and sent["max_tokens"] >= 32000
        assert sent["model"] == "claude-sonnet-4-5"  # the route's upstream model, whatever name was asked
    else:  # openai-format: translated to chat completions
        assert sent["messages"][0]["role"] == "system" and sent["stream"] is True
    deadline = time.time() + 10  # the log rows are written in batches
    while True:
        logs = gateway["admin"].get(f"/accounts/{gateway['account']['id']}/logs", params={"limit": 20}).json()
        if any((row["model_requested"] == model if model else row["model_requested"].startswith("claude-"))
               and row["status"] == 200 and row["api"] == "messages" for row in logs["data"]):
            break
        assert time.time() < deadline, f"no 200 row for {model} in the request logs: {logs['data'][:3]}"
        time.sleep(0.2)


def test_codex_answers_through_the_responses_api(bin_dir, gateway, tmp_path):
    codex_home = tmp_path / ".codex"
    codex_home.mkdir()
    (codex_home / "config.toml").write_text(f"""
model = "gpt-4o-mini"
model_provider = "trex"

[model_providers.trex]
name = "Trex"
base_url = "{gateway['base']}/v1"
env_key = "TREX_API_KEY"
wire_api = "responses"
""")
    env = {**_home(tmp_path), "CODEX_HOME": str(codex_home), "TREX_API_KEY": gateway["key"]}
    done = subprocess.run([str(bin_dir / "codex"), "exec", "--skip-git-repo-check", "say hello"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Hello from" in done.stdout
    sent = gateway["mocks"]["alpha"].stats()["last_body"]
    names = [t["function"]["name"] for t in sent["tools"]]
    assert any("__" in n for n in names)  # its namespace tool, flattened for the chat provider
