"""Role-by-role checks of chat `messages` and Responses `input` items, as the OpenAI API makes them.

Plain dict checks on the decoded body (no model objects per message): they run on every request,
before authentication. Only what OpenAI requires is checked; unknown keys, content-part types and
item types pass through untouched, so new OpenAI features keep working. A violation is a 400
naming its path the way OpenAI does (`messages[0].content`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from trex_serve.errors import InvalidRequest
from trex_serve.providers.anthropic.thinking import check_effort

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
INPUT_ROLES = ("user", "assistant", "system", "developer")

# The field a content part of a known type cannot do without; other types pass as they are.
_PART_FIELD = {"text": "text", "input_text": "text", "output_text": "text", "image_url": "image_url",
               "input_audio": "input_audio", "file": "file", "refusal": "refusal"}


def _missing(param: str) -> NoReturn:
    raise InvalidRequest(f"Missing required parameter: '{param}'.", param=param)


def _invalid(param: str, expected: str) -> NoReturn:
    raise InvalidRequest(f"Invalid type for '{param}': expected {expected}.", param=param)


def _string(obj: dict[str, Any], field: str, param: str) -> None:
    value = obj.get(field)
    if value is None:
        _missing(f"{param}.{field}")
    if not isinstance(value, str):
        _invalid(f"{param}.{field}", "a string")


def _content(value: Any, param: str) -> None:
    """A string, or a list of typed parts (`{"type": ..., ...}`)."""
    if isinstance(value, str):
        return
    if not isinstance(value, list):
        _invalid(param, "a string or an array of content parts")
    for i, part in enumerate(value):
        if not isinstance(part, dict):
            _invalid(f"{param}[{i}]", "an object")
        kind = part.get("type")
        if not isinstance(kind, str):
            _missing(f"{param}[{i}].type") if kind is None else _invalid(f"{param}[{i}].type", "a string")
        need = _PART_FIELD.get(kind)
        if need is not None and part.get(need) is None:
            _missing(f"{param}[{i}].{need}")


def _required_content(message: dict[str, Any], param: str) -> None:
    content = message.get("content")
    if content is None:
        _missing(f"{param}.content")
    _content(content, f"{param}.content")


def _tool_calls(calls: Any, param: str) -> None:
    if not isinstance(calls, list):
        _invalid(param, "an array")
    for i, call in enumerate(calls):
        p = f"{param}[{i}]"
        if not isinstance(call, dict):
            _invalid(p, "an object")
        _string(call, "id", p)
        if call.get("type", "function") == "function":
            _function(call.get("function"), f"{p}.function")


def _function(fn: Any, param: str) -> None:
    if fn is None:
        _missing(param)
    if not isinstance(fn, dict):
        _invalid(param, "an object")
    _string(fn, "name", param)
    _string(fn, "arguments", param)


def _assistant(message: dict[str, Any], param: str) -> None:
    content = message.get("content")
    if content is not None:
        _content(content, f"{param}.content")
    if message.get("tool_calls") is not None:
        _tool_calls(message["tool_calls"], f"{param}.tool_calls")
    elif message.get("function_call") is not None:
        _function(message["function_call"], f"{param}.function_call")
    elif content is None and message.get("audio") is None:
        # `content: null` is fine only beside tool_calls (or a legacy function_call, or audio).
        _missing(f"{param}.content")


def _tool(message: dict[str, Any], param: str) -> None:
    _string(message, "tool_call_id", param)
    _required_content(message, param)


def _legacy_function(message: dict[str, Any], param: str) -> None:
    _string(message, "name", param)


_CHAT_CHECKS: dict[str, Callable[[dict[str, Any], str], None]] = {
    "system": _required_content, "developer": _required_content, "user": _required_content,
    "assistant": _assistant, "tool": _tool, "function": _legacy_function,
}


def _role(obj: dict[str, Any], param: str, allowed: tuple[str, ...]) -> str:
    role = obj.get("role")
    if role is None:
        _missing(f"{param}.role")
    if role not in allowed:
        supported = ", ".join(f"'{r}'" for r in allowed)
        shown = role if isinstance(role, str) else type(role).__name__
        raise InvalidRequest(f"Invalid value: '{shown}'. Supported values are: {supported}.",
                             param=f"{param}.role")
    return role


def check_chat_messages(messages: list[Any]) -> None:
    """Raise InvalidRequest for the first message OpenAI would refuse."""
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            _invalid(param, "an object")
        _CHAT_CHECKS[_role(message, param, CHAT_ROLES)](message, param)


def _input_message(item: dict[str, Any], param: str) -> None:
    _role(item, param, INPUT_ROLES)
    _required_content(item, param)


def _call(item: dict[str, Any], param: str) -> None:
    for field in ("call_id", "name", "arguments"):
        _string(item, field, param)


def _call_output(item: dict[str, Any], param: str) -> None:
    _string(item, "call_id", param)
    output = item.get("output")
    if output is None:
        _missing(f"{param}.output")
    _content(output, f"{param}.output")


def _reference(item: dict[str, Any], param: str) -> None:
    _string(item, "id", param)


_ITEM_CHECKS: dict[str, Callable[[dict[str, Any], str], None]] = {
    "message": _input_message, "function_call": _call, "function_call_output": _call_output,
    "item_reference": _reference,
}


def check_chat_request(payload: dict[str, Any]) -> None:
    """A chat completions body's messages and reasoning effort."""
    check_chat_messages(payload["messages"])
    check_effort(payload.get("reasoning_effort"), "reasoning_effort")


def check_responses_request(payload: dict[str, Any]) -> None:
    """A Responses body's input items and reasoning effort."""
    check_responses_input(payload.get("input"))
    reasoning = payload.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        _invalid("reasoning", "an object")
    check_effort((reasoning or {}).get("effort"), "reasoning.effort")


def check_responses_input(value: Any) -> None:
    """`input` of a Responses request: a string, or a list of items (messages, function calls and
    their outputs, references; other item types only need a string `type`)."""
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, list):
        _invalid("input", "a string or an array of input items")
    for i, item in enumerate(value):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            _invalid(param, "an object")
        kind = item.get("type")
        if kind is None:
            if "role" not in item:
                _missing(f"{param}.role")
            kind = "message"  # the short form: {"role": ..., "content": ...}
        elif not isinstance(kind, str):
            _invalid(f"{param}.type", "a string")
        check = _ITEM_CHECKS.get(kind)
        if check is not None:
            check(item, param)
