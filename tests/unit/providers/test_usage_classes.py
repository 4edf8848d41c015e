"""Token classes read from the providers' own wire (tests/fixtures/wire/), whole answers and streams,
and what billing makes of them."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from trex_serve.api.responses import chat_to_response
from trex_serve.billing.pricing import ClassPrices, charge_micro
from trex_serve.providers.registry import adapter_for
from trex_serve.providers.sse import parse_usage_comment, usage_comment
from trex_serve.providers.usage import Usage

WIRE = Path(__file__).parents[2] / "fixtures" / "wire"


def load(name: str) -> bytes:
    return (WIRE / name).read_bytes()


def stream_through(fmt: str, raw: bytes, want_usage: bool, piece: int = 37) -> tuple[bytes, Usage]:
    """Feed a recorded stream through the adapter's translator in uneven pieces, as sockets deliver it."""
    translator = adapter_for(fmt).stream_translator("chat", want_usage, "public-model")
    out = b"".join(translator.feed(raw[i:i + piece]) for i in range(0, len(raw), piece)) + translator.finish()
    assert translator.usage is not None
    return out, translator.usage


def chunks(out: bytes) -> list[dict]:
    return [orjson.loads(line[6:]) for line in out.split(b"\n") if line.startswith(b"data: {")]


ANTHROPIC_CACHED = Usage(input_tokens=1200, output_tokens=500, cache_read_tokens=30000,
                         cache_write_tokens=1500, cache_write_1h_tokens=500)


# ---- each provider's usage shape ----------------------------------------------------------------


def test_openai_chat_cached_tokens_are_cache_reads_within_the_prompt():
    _, usage = adapter_for("openai").translate_response("chat", load("openai_chat_cached.json"))
    assert usage == Usage(input_tokens=86, output_tokens=300, cache_read_tokens=1920)
    assert usage.prompt_tokens == 2006


def test_openai_chat_reasoning_tokens_are_within_output():
    _, usage = adapter_for("openai").translate_response("chat", load("openai_chat_reasoning.json"))
    assert usage == Usage(input_tokens=52, output_tokens=1210, cache_read_tokens=1408, reasoning_tokens=1152)


def test_openai_compatible_cache_write_tokens_are_read():
    _, usage = adapter_for("openai").translate_response("chat", load("openai_compatible_cache_write.json"))
    assert usage == Usage(input_tokens=21, output_tokens=60, cache_write_tokens=10318)


def test_native_responses_usage_details_are_read():
    _, usage = adapter_for("openai").translate_response("responses", load("openai_responses_reasoning.json"))
    assert usage == Usage(input_tokens=256, output_tokens=900, cache_read_tokens=1280, reasoning_tokens=640)


def test_anthropic_whole_answer_keeps_cache_read_and_the_5m_1h_write_split():
    body, usage = adapter_for("anthropic").translate_response("chat", load("anthropic_message_cached.json"))
    assert usage == ANTHROPIC_CACHED
    # The client sees OpenAI's fields: the whole prompt, the cached part, the written part.
    assert orjson.loads(body)["usage"] == {
        "prompt_tokens": 33200, "completion_tokens": 500, "total_tokens": 33700,
        "prompt_tokens_details": {"cached_tokens": 30000, "cache_write_tokens": 2000}}


def test_anthropic_write_without_split_counts_as_5_minute_writes():
    usage = Usage.from_anthropic({"input_tokens": 10, "cache_creation_input_tokens": 700,
                                  "cache_read_input_tokens": 0, "output_tokens": 3})
    assert usage == Usage(input_tokens=10, output_tokens=3, cache_write_tokens=700)


def test_anthropic_stream_usage_from_message_start_and_delta():
    out, usage = stream_through("anthropic", load("anthropic_stream_cached.sse"), want_usage=True)
    assert usage == ANTHROPIC_CACHED
    final = [c for c in chunks(out) if c.get("usage")]
    assert final[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 30000, "cache_write_tokens": 2000}
    assert parse_usage_comment(out) == ANTHROPIC_CACHED


def test_openai_stream_usage_chunk_read_and_dropped_when_not_asked_for():
    out, usage = stream_through("openai", load("openai_chat_stream_cached.sse"), want_usage=False)
    assert usage == Usage(input_tokens=86, output_tokens=300, cache_read_tokens=1920)
    assert not [c for c in chunks(out) if c.get("usage")]
    assert parse_usage_comment(out) == usage


def test_translated_responses_usage_reports_cache_writes():
    body, _ = adapter_for("anthropic").translate_response("chat", load("anthropic_message_cached.json"))
    usage = chat_to_response(body, {"model": "claude"})["usage"]
    assert usage["input_tokens"] == 33200
    assert usage["input_tokens_details"] == {"cached_tokens": 30000, "cache_write_tokens": 2000}


# ---- the hop ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("usage", [ANTHROPIC_CACHED, Usage(5, 7, True), Usage(0, 9, False, reasoning_tokens=4)])
def test_usage_crosses_the_hop_whole(usage):
    assert Usage.from_header(usage.header()) == usage
    assert parse_usage_comment(b"data: [DONE]\n\n" + usage_comment(usage)) == usage


def test_older_three_number_header_still_reads():
    assert Usage.from_header("12,3,1") == Usage(12, 3, True)
    assert Usage.from_header("1,2") is None and Usage.from_header("a,b,c") is None
    assert Usage.from_header("-1,2,0") is None


# ---- billing per class, against the price sheets ----------------------------------------------------

SONNET = ClassPrices(input=Decimal("3"), output=Decimal("15"), cache_read=Decimal("0.30"),
                     cache_write=Decimal("3.75"), cache_write_1h=Decimal("6"), reasoning=Decimal("15"))
MINI = ClassPrices(input=Decimal("0.15"), output=Decimal("0.60"), cache_read=Decimal("0.075"),
                   cache_write=Decimal("0.15"), cache_write_1h=Decimal("0.15"), reasoning=Decimal("0.60"))


def test_cached_anthropic_call_is_charged_class_by_class():
    # 1,200 x 3 + 30,000 x 0.30 + 1,500 x 3.75 + 500 x 6 + 500 x 15 micro-credits
    assert charge_micro(ANTHROPIC_CACHED, SONNET) == 3600 + 9000 + 5625 + 3000 + 7500
    flat = charge_micro(Usage(ANTHROPIC_CACHED.prompt_tokens, 500), SONNET)
    assert flat == 33200 * 3 + 500 * 15  # what pricing every prompt token as input would have charged


def test_cached_openai_call_is_charged_at_the_cached_input_price():
    _, usage = adapter_for("openai").translate_response("chat", load("openai_chat_cached.json"))
    assert charge_micro(usage, MINI) == 337  # ceil(86 x 0.15 + 1,920 x 0.075 + 300 x 0.60) = ceil(336.9)


def test_reasoning_priced_apart_only_when_the_catalog_says_so():
    usage = Usage(input_tokens=0, output_tokens=1000, reasoning_tokens=800)
    assert charge_micro(usage, SONNET) == 15000
    apart = ClassPrices(SONNET.input, SONNET.output, SONNET.cache_read, SONNET.cache_write,
                        SONNET.cache_write_1h, reasoning=Decimal("20"))
    assert charge_micro(usage, apart) == 200 * 15 + 800 * 20
