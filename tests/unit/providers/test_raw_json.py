"""The same-format pass-through's body edit (providers/raw_json.py) and stream relay
(providers/anthropic/passthrough.py): the client's bytes with only the model rewritten."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trex_serve.providers.anthropic.passthrough import AnthropicPassthroughStream, request_body
from trex_serve.providers.raw_json import edit_top_level

ODD = (b'{\n  "max_tokens" : 64000,\n  "messages": [{"role": "user", "content": "caf\\u00e9 \xc3\xa9 \\ud83d\\ude00"}],'
       b'\n  "model":"claude-sonnet",  "temperature": 1.0e0, "trex": {"routing": {"allow_fallbacks": false}},'
       b'\n  "metadata": {"user_id": "u"}\n}\n')


def test_only_the_model_changes_byte_for_byte():
    out = edit_top_level(ODD, {"model": "claude-sonnet-4-5"}, drop=("trex",))
    expected = ODD.replace(b'"model":"claude-sonnet"', b'"model":"claude-sonnet-4-5"').replace(
        b'"trex": {"routing": {"allow_fallbacks": false}},\n  ', b"")
    assert out == expected
    assert orjson.loads(out)["messages"] == orjson.loads(ODD)["messages"]


@pytest.mark.parametrize(("raw", "expected"), [
    (b"{}", b'{"model":"m"}'),
    (b'{"trex": 1}', b'{"model":"m"}'),
    (b'{"a": 1, "trex": 2}', b'{"model":"m","a": 1}'),
    (b'{"trex": 2, "a": 1}', b'{"model":"m","a": 1}'),
    (b'{"a": 1, "trex": 2, "b": 3}', b'{"model":"m","a": 1, "b": 3}'),
    (b'{"model": "x", "a": {"model": "inner"}, "model": "y"}',
     b'{"model": "m", "a": {"model": "inner"}, "model": "m"}'),
    (b'{"mod\\u0065l": "x"}', b'{"mod\\u0065l": "m"}'),  # a key spelled with an escape is still the model
])
def test_edge_cases(raw, expected):
    assert edit_top_level(raw, {"model": "m"}, drop=("trex",)) == expected


@pytest.mark.parametrize("raw", [b"[]", b'"x"', b'{"a":}', b'{"a":1,}', b'{"a":1} x', b'{"a" 1}', b"\xff{}",
                                 b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}"])
def test_anything_but_one_object_is_refused(raw):
    with pytest.raises(ValueError):
        edit_top_level(raw, {"model": "m"})


def test_a_body_it_cannot_edit_is_sent_serialised_again():
    deep = b'{"model": "x", "a": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    body = {"model": "x", "trex": {}, "messages": []}
    assert orjson.loads(request_body(body, "up", deep[:-1])) == {"model": "up", "messages": []}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3), max_leaves=8)


@given(st.dictionaries(st.text(max_size=6), json_values, max_size=6), st.booleans())
def test_same_meaning_as_parsing_and_editing(obj, pretty):
    raw = json.dumps(obj, indent=2 if pretty else None, ensure_ascii=pretty).encode()
    out = edit_top_level(raw, {"model": "m"}, drop=("trex",))
    want = {k: v for k, v in obj.items() if k != "trex"} | {"model": "m"}
    assert json.loads(out) == want


def test_stream_relays_whole_events_and_never_half_of_one_before_an_error():
    stream = AnthropicPassthroughStream()
    start = (b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":10,'
             b'"cache_read_input_tokens":900}}}\n\n')
    assert stream.feed(start[:30]) == b""
    assert stream.feed(start[30:] + b"event: content_block_delta\ndata: {\"type\":\"content_") == start
    failed = stream.error_event("claude stream interrupted")
    tail = stream.finish()
    assert failed == b'event: error\ndata: {"type":"error","error":{"type":"api_error",' \
                     b'"message":"claude stream interrupted"}}\n\n'
    assert tail.startswith(b": trex-usage ") and stream.usage is not None
    assert stream.usage.cache_read_tokens == 900 and stream.usage.estimated


def test_stream_with_crlf_framing_is_relayed_as_it_comes():
    stream = AnthropicPassthroughStream()
    first = b'event: ping\r\ndata: {"type":"ping"}\r\n\r\n'
    assert stream.feed(first + b"event: pi") == first
    assert stream.feed(b'ng\r\ndata: {"type":"ping"}\r\n\r\n') == b'event: ping\r\ndata: {"type":"ping"}\r\n\r\n'
