"""OpenAI chat ↔ Anthropic Messages, whole bodies: the request mapping and the answer mapping.

`to_anthropic` maps an OpenAI chat completions body to an Anthropic Messages request (a new dict,
the caller's body is never mutated, so a fallback can translate it again); `to_openai` maps a whole
Anthropic message back to a chat.completion. The stop-reason and usage helpers here are shared with
the stream translator (`stream.py`)."""

from __future__ import annotations

import time
from typing import Any

import orjson

from trex_serve.providers.anthropic import thinking
from trex_serve.providers.base import Usage

ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def finish_reason(stop_reason: Any) -> str | None:
    if stop_reason is None:
        return None
    return FINISH_REASONS.get(str(stop_reason), "stop")


# ---- request: OpenAI chat → Anthropic messages ------------------------------------------------


def _text_of(content: Any) -> str:
    """Plain text of a message content that is a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text") or "") for p in content
                       if isinstance(p, dict) and p.get("type") in ("text", "input_text", "output_text"))
    return "" if content is None else str(content)


def _image_block(part: dict[str, Any]) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    url = str(url or "")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        media_type = header[5:].split(";", 1)[0] or "image/png"
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _blocks(content: Any) -> list[dict[str, Any]]:
    """Anthropic content blocks of an OpenAI user/assistant content (string or parts)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    out: list[dict[str, Any]] = []
    for part in content if isinstance(content, list) else [content]:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text") and part.get("text"):
            out.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            out.append(_image_block(part))
        elif kind == "refusal" and part.get("refusal"):
            out.append({"type": "text", "text": part["refusal"]})
    return out


def _tool_input(arguments: Any) -> Any:
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}
    try:
        value = orjson.loads(arguments)
    except (orjson.JSONDecodeError, TypeError):
        return {"_raw": str(arguments)}
    return value if isinstance(value, dict) else {"value": value}


def _message(msg: dict[str, Any]) -> tuple[str, list[dict[str, Any]]] | None:
    role = msg.get("role")
    if role == "assistant":
        blocks = thinking.request_blocks(msg) + _blocks(msg.get("content"))
        for call in msg.get("tool_calls") or []:
            fn = call.get("function") or {}
            blocks.append({"type": "tool_use", "id": call.get("id") or "", "name": fn.get("name") or "",
                           "input": _tool_input(fn.get("arguments"))})
        return "assistant", blocks
    if role == "tool":
        content = msg.get("content")
        result: Any = content if isinstance(content, str) else _blocks(content)
        return "user", [{"type": "tool_result", "tool_use_id": msg.get("tool_call_id") or "",
                         "content": result}]
    if role in ("user", "function"):
        return "user", _blocks(msg.get("content"))
    return None


def _messages(messages: list[Any]) -> tuple[str, list[dict[str, Any]]]:
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for msg in messages:
        if not isinstance(msg, dict):
            continue
        if msg.get("role") in ("system", "developer"):
            text = _text_of(msg.get("content"))
            if text:
                system.append(text)
            continue
        mapped = _message(msg)
        if mapped is None or not mapped[1]:
            continue
        role, blocks = mapped
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)  # Anthropic wants turns to alternate
        else:
            out.append({"role": role, "content": blocks})
    for m in out:  # a single text block reads better (and cheaper) as a plain string
        c = m["content"]
        if len(c) == 1 and c[0]["type"] == "text":
            m["content"] = c[0]["text"]
    return "\n\n".join(system), out


def _tools(tools: list[Any]) -> list[dict[str, Any]]:
    out = []
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            continue
        fn = tool.get("function") or {}
        entry: dict[str, Any] = {"name": fn.get("name") or "",
                                 "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
        if fn.get("description"):
            entry["description"] = fn["description"]
        out.append(entry)
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice is None:
        mapped: dict[str, Any] | None = {"type": "auto"} if parallel is False else None
    elif choice == "auto":
        mapped = {"type": "auto"}
    elif choice == "required":
        mapped = {"type": "any"}
    elif choice == "none":
        mapped = {"type": "none"}
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") or choice.get("name")
        mapped = {"type": "tool", "name": name} if name else {"type": "auto"}
    else:
        mapped = None
    if mapped is not None and parallel is False and mapped["type"] != "none":
        mapped["disable_parallel_tool_use"] = True
    return mapped


def to_anthropic(body: dict[str, Any], upstream_model: str, stream: bool,
                 thinking_form: str | None = None) -> dict[str, Any]:
    """The Anthropic Messages request for an OpenAI chat completions body (a new dict).
    ``thinking_form``: how the upstream model takes reasoning ("budget" | "adaptive")."""
    system, messages = _messages(list(body.get("messages") or []))
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
    out: dict[str, Any] = {"model": upstream_model, "messages": messages, "max_tokens": max_tokens}
    if system:
        out["system"] = system
    if body.get("temperature") is not None:
        out["temperature"] = min(float(body["temperature"]), 1.0)  # Anthropic's range is 0..1
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    tools = _tools(body.get("tools") or [])
    if tools:
        out["tools"] = tools
        choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice is not None:
            out["tool_choice"] = choice
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    thinking.apply_effort(out, body.get("reasoning_effort"), thinking_form)
    if stream:
        out["stream"] = True
    return out


# ---- response: Anthropic message → OpenAI chat.completion -------------------------------------


def to_openai(data: dict[str, Any]) -> tuple[dict[str, Any], Usage | None]:
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in data.get("content") or []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            text.append(str(block.get("text") or ""))
        elif block.get("type") == "tool_use":
            calls.append({"id": block.get("id") or "", "type": "function",
                          "function": {"name": block.get("name") or "",
                                       "arguments": orjson.dumps(block.get("input") or {}).decode()}})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not calls else None,
                               "refusal": None, **thinking.answer_fields(data.get("content") or [])}
    if calls:
        message["tool_calls"] = calls
    answer: dict[str, Any] = {
        "id": str(data.get("id") or "msg"), "object": "chat.completion", "created": int(time.time()),
        "model": data.get("model"),
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": finish_reason(data.get("stop_reason")) or "stop"}],
    }
    usage = Usage.from_anthropic(data.get("usage"))
    if usage is None:
        return answer, None
    answer["usage"] = usage.openai_chat()
    return answer, usage
