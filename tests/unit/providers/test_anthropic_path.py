"""The data path with an Anthropic-format provider, without Ray: FastAPI app → pipeline → relay hop
(real HTTP) → pool server → Anthropic adapter → mock upstream processes. The client only ever sees
OpenAI-shaped answers, and an overloaded (529) Anthropic provider falls back to an OpenAI one."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest

from tests.fakes import data_path_client
from tests.helpers import MockProcess
from trex_serve.catalog import load_catalog

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def write_catalog(path, claude: MockProcess, alpha: MockProcess):
    path.write_text(f"""
providers:
  - name: claude
    base_url: {claude.url}/v1
    format: anthropic
    auth: none
    timeout_s: 2
    first_byte_timeout_s: 1.5
    connect_timeout_s: 1
  - name: alpha
    base_url: {alpha.url}/v1
    format: openai
    auth: none
    timeout_s: 2
    first_byte_timeout_s: 1.5
    connect_timeout_s: 1
models:
  - id: claude-sonnet
    tier: standard
    context_window: 200000
    price: {{input_per_mtok: 3.0, output_per_mtok: 15.0}}
    candidates:
      - {{provider: claude, model: claude-sonnet-4-5}}
      - {{provider: alpha, model: alpha-mini}}
plans:
  - name: free
    rpm: 1000
    tpm: 10000000
    concurrency: 50
    burst_concurrency: 60
    daily_quota: {{requests: 100000, tokens: 100000000}}
    long_context_tokens: 32000
    premium: true
""")
    return path


@pytest.fixture(scope="module")
def mocks():
    procs = {"claude": MockProcess("claude"), "alpha": MockProcess("alpha")}
    yield procs
    for p in procs.values():
        p.stop()


@pytest.fixture(params=["fastapi", "direct"])
async def gateway(mocks, tmp_path, request):
    """Through the FastAPI app and through the direct data server (web/data_server.py)."""
    for m in mocks.values():
        m.reset()
    catalog = load_catalog(write_catalog(tmp_path / "catalog.yaml", mocks["claude"], mocks["alpha"]))
    async with data_path_client(catalog, front=request.param) as client:
        yield client


def chat(**extra):
    return {"model": "claude-sonnet", "messages": [{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "hi there"}], **extra}


def stream_chunks(raw: bytes) -> list[dict]:
    return [orjson.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]


def answer_text(raw: bytes) -> str:
    """The assistant text of a whole answer or of a stream."""
    if raw.startswith(b"{"):
        return orjson.loads(raw)["choices"][0]["message"]["content"]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in stream_chunks(raw) if c["choices"])


async def read_stream(gateway, body) -> tuple[httpx.Response, bytes]:
    async with gateway.stream("POST", "/v1/chat/completions", json=body) as r:
        raw = b"".join([c async for c in r.aiter_bytes()])
    return r, raw


async def test_non_stream_through_anthropic_comes_back_openai_shaped(gateway, mocks):
    r = await gateway.post("/v1/chat/completions", json=chat(max_tokens=64),
                           headers={"X-Upstream-Api-Key": "sk-ant-override"})
    assert r.status_code == 200, r.text
    assert r.headers["x-trex-upstream-provider"] == "claude"
    assert r.headers["x-trex-upstream-model"] == "claude-sonnet-4-5"
    data = r.json()
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["content"] == "Hello from claude! You said: hi there"
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"]["prompt_tokens"] > 0 and data["usage"]["completion_tokens"] > 0
    sent = mocks["claude"].stats()["last_body"]
    assert sent["system"] == "Be brief." and sent["max_tokens"] == 64
    assert sent["messages"] == [{"role": "user", "content": "hi there"}]
    [s] = gateway.gate.settlements
    assert s.success and s.prompt_tokens == data["usage"]["prompt_tokens"]


async def test_forced_tool_call_comes_back_as_openai_tool_calls(gateway):
    r = await gateway.post("/v1/chat/completions", json=chat(tools=[WEATHER_TOOL], tool_choice="required"))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert orjson.loads(call["function"]["arguments"]) == {"query": "hi there"}


async def test_stream_through_anthropic_is_chat_completion_chunks(gateway):
    r, raw = await read_stream(gateway, chat(stream=True))
    assert r.status_code == 200 and r.headers["x-trex-upstream-provider"] == "claude"
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]"
    parsed = stream_chunks(raw)
    assert all(c["object"] == "chat.completion.chunk" for c in parsed)
    assert answer_text(raw) == "Hello from claude! You said: hi there"
    assert parsed[-1]["choices"][0]["finish_reason"] == "stop"
    assert not any("usage" in c for c in parsed)
    await asyncio.sleep(0.05)
    [s] = gateway.gate.settlements
    assert s.success and s.prompt_tokens > 0 and s.completion_tokens > 0


async def test_stream_include_usage_through_anthropic(gateway):
    _, raw = await read_stream(gateway, chat(stream=True, stream_options={"include_usage": True}))
    usage = [c for c in stream_chunks(raw) if c.get("usage")]
    assert len(usage) == 1 and usage[0]["choices"] == []
    assert usage[0]["usage"]["completion_tokens"] == len("Hello from claude! You said: hi there".split(" "))


async def test_stream_tool_call_through_anthropic(gateway):
    _, raw = await read_stream(gateway, chat(stream=True, tools=[WEATHER_TOOL],
                                             tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    calls = [tc for c in stream_chunks(raw) for tc in c["choices"][0]["delta"].get("tool_calls") or []]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"].startswith("toolu_")
    assert orjson.loads("".join(tc["function"]["arguments"] for tc in calls)) == {"query": "hi there"}


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_529_overload_falls_back_to_openai_provider(gateway, mocks, stream):
    mocks["claude"].control(fail_next=1, error_status=529)
    r, raw = await read_stream(gateway, chat(stream=stream))
    assert r.status_code == 200, raw
    assert r.headers["x-trex-upstream-provider"] == "alpha"
    assert r.headers["x-trex-attempts"] == "2"
    assert mocks["claude"].stats()["by_status"] == {"529": 1}
    assert answer_text(raw).startswith("Hello from alpha")
    await asyncio.sleep(0.05)
    assert [s.success for s in gateway.gate.settlements] == [True]


async def test_anthropic_400_passes_through_as_openai_error(gateway, mocks):
    mocks["claude"].control(fail_next=1, error_status=400)
    r = await gateway.post("/v1/chat/completions", json=chat())
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_request_error" and "claude injected 400" in err["message"]
    assert mocks["alpha"].stats()["requests"] == 0


async def test_anthropic_stream_falls_back_before_first_byte(gateway, mocks):
    mocks["claude"].control(first_byte_delay_ms=3000)
    r, raw = await read_stream(gateway, chat(stream=True))
    assert r.headers["x-trex-upstream-provider"] == "alpha"
    assert answer_text(raw).startswith("Hello from alpha")
