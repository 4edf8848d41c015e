"""Role-by-role validation of chat messages and Responses input items (trex_serve.api.input_checks)."""

from __future__ import annotations

import pytest

from trex_serve.api.input_checks import check_chat_messages, check_responses_input
from trex_serve.errors import InvalidRequest

CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}

VALID_CHATS = {
    "every_role": [
        {"role": "system", "content": "be brief"},
        {"role": "developer", "content": [{"type": "text", "text": "rules"}]},
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        {"role": "assistant", "content": "done"},
        {"role": "function", "name": "f", "content": "legacy"},
        {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},
    ],
    "empty_string_content": [{"role": "user", "content": ""}],
    "unknown_keys_and_part_types_pass": [
        {"role": "user", "content": [{"type": "brand_new_part", "payload": 1}], "future_field": {"a": 1}},
        {"role": "assistant", "content": "x", "refusal": None, "whatever": True},
    ],
    "assistant_audio_only": [{"role": "assistant", "audio": {"id": "audio_1"}}],
}

INVALID_CHATS = [
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "system", "content": "x"}, {"role": "system"}], "messages[1].content"),
    ([{"role": "developer", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": {"text": "x"}}], "messages[0].content"),
    ([{"role": "user", "content": ["x"]}], "messages[0].content[0]"),
    ([{"role": "user", "content": [{"text": "x"}]}], "messages[0].content[0].type"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0].image_url"),
    ([{"role": "assistant"}], "messages[0].content"),
    ([{"role": "assistant", "content": None}], "messages[0].content"),
    ([{"role": "assistant", "tool_calls": "x"}], "messages[0].tool_calls"),
    ([{"role": "assistant", "tool_calls": [{"type": "function"}]}], "messages[0].tool_calls[0].id"),
    ([{"role": "assistant", "tool_calls": [{"id": "c"}]}], "messages[0].tool_calls[0].function"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}],
     "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "assistant", "function_call": {"arguments": "{}"}}], "messages[0].function_call.name"),
    ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
    ([{"role": "tool", "tool_call_id": 7, "content": "x"}], "messages[0].tool_call_id"),
    ([{"role": "tool", "tool_call_id": "c"}], "messages[0].content"),
    ([{"role": "function", "content": "x"}], "messages[0].name"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role"),
    ([{"role": 1, "content": "x"}], "messages[0].role"),
    ([{"content": "x"}], "messages[0].role"),
    ([None], "messages[0]"),
    (["hi"], "messages[0]"),
]


@pytest.mark.parametrize("name", sorted(VALID_CHATS))
def test_valid_chat_messages_pass(name):
    check_chat_messages(VALID_CHATS[name])


@pytest.mark.parametrize("messages,param", INVALID_CHATS)
def test_invalid_chat_message_names_its_path(messages, param):
    with pytest.raises(InvalidRequest) as err:
        check_chat_messages(messages)
    assert err.value.param == param
    assert err.value.status == 400 and err.value.code == "invalid_request_error"
    assert param in err.value.message or "Invalid value" in err.value.message


def test_unknown_role_lists_the_supported_ones():
    with pytest.raises(InvalidRequest) as err:
        check_chat_messages([{"role": "wizard", "content": "x"}])
    assert "'wizard'" in err.value.message and "'tool'" in err.value.message


VALID_INPUTS = [
    None,
    "hello",
    [{"role": "user", "content": "hi"}],
    [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "x"}]},
     {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "y"}], "id": "m"},
     {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
     {"type": "function_call_output", "call_id": "c1", "output": "42"},
     {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "42"}]},
     {"type": "item_reference", "id": "msg_1"},
     {"type": "reasoning", "id": "rs_1", "summary": []},
     {"type": "some_future_item", "anything": 1}],
]

INVALID_INPUTS = [
    (5, "input"),
    ({"role": "user"}, "input"),
    ([1], "input[0]"),
    ([{"role": "user"}], "input[0].content"),
    ([{"content": "x"}], "input[0].role"),
    ([{"role": "tool", "content": "x"}], "input[0].role"),
    ([{"type": "message", "content": "x"}], "input[0].role"),
    ([{"role": "user", "content": [{"type": "input_text"}]}], "input[0].content[0].text"),
    ([{"type": 3}], "input[0].type"),
    ([{"type": "function_call", "name": "f", "arguments": "{}"}], "input[0].call_id"),
    ([{"type": "function_call", "call_id": "c", "arguments": "{}"}], "input[0].name"),
    ([{"type": "function_call_output", "call_id": "c"}], "input[0].output"),
    ([{"type": "function_call_output", "output": "x"}], "input[0].call_id"),
    ([{"type": "item_reference"}], "input[0].id"),
    (["ok", {"role": "user", "content": "x"}], "input[0]"),
]


@pytest.mark.parametrize("value", VALID_INPUTS)
def test_valid_responses_input_passes(value):
    check_responses_input(value)


@pytest.mark.parametrize("value,param", INVALID_INPUTS)
def test_invalid_responses_input_names_its_path(value, param):
    with pytest.raises(InvalidRequest) as err:
        check_responses_input(value)
    assert err.value.param == param
