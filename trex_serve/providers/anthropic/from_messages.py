"""Anthropic Messages → OpenAI chat, whole bodies: the same pair as `mapping.py`, the other way
(a client speaking Anthropic's API served by an openai-format provider). The tables of `mapping.py`
and `thinking.py` are read backwards here, never written twice.

What an OpenAI-format provider cannot take is dropped (docs/CLIENTS.md): `cache_control` (kept on
text parts only for providers whose catalog entry says `cache_control: true`, without Anthropic's
`ttl`), `thinking` / `output_config` unless the catalog candidate says `thinking: effort` (then
`reasoning_effort`, by thinking.py's tables read backwards: many OpenAI-compatible models refuse
the field outright), thinking blocks of earlier turns (their signatures mean nothing there), server
tools (`web_search_*`, ...), `context_management`, `top_k`, `service_tier`. Reasoning in the answer
(`reasoning_content`, `reasoning`, or an Anthropic front's `thinking_blocks`) comes back as
thinking blocks."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from trex_serve.providers.anthropic.mapping import FINISH_REASONS
from trex_serve.providers.anthropic.thinking import ADAPTIVE_EFFORTS, BUDGETS, request_blocks
from trex_serve.providers.usage import Usage

# finish_reason → stop_reason: the first Anthropic reason of each OpenAI one in mapping's table.
STOP_REASONS = {openai: anthropic for anthropic, openai in reversed(list(FINISH_REASONS.items()))}
# Anthropic's adaptive effort → OpenAI's: the last (plainest) OpenAI effort of each in thinking's table.
EFFORTS_OF_ADAPTIVE = {anthropic: openai for openai, anthropic in ADAPTIVE_EFFORTS.items()}


def reasoning_effort(body: dict[str, Any]) -> str | None:
    """OpenAI's ``reasoning_effort`` for an Anthropic request's ``thinking``: a budget as the largest
    effort whose budget it reaches, adaptive thinking by its ``output_config.effort`` (Anthropic's
    default, high, when it names none); None when thinking is off."""
    spec = body.get("thinking")
    if not isinstance(spec, dict):
        return None
    if spec.get("type") == "enabled":
        budget = spec.get("budget_tokens") if isinstance(spec.get("budget_tokens"), int) else 0
        return max((e for e, b in BUDGETS.items() if b <= budget), key=BUDGETS.__getitem__, default="minimal")
    if spec.get("type") == "adaptive":
        config = body.get("output_config")
        effort = config.get("effort") if isinstance(config, dict) else None
        return EFFORTS_OF_ADAPTIVE.get(effort, "high") if isinstance(effort, str) else "high"
    return None


def _part(block: dict[str, Any], keep_cache: bool) -> dict[str, Any] | None:
    kind = block.get("type")
    if kind == "text":
        part: dict[str, Any] = {"type": "text", "text": str(block.get("text") or "")}
        cache = block.get("cache_control")
        if keep_cache and isinstance(cache, dict):
            part["cache_control"] = {k: v for k, v in cache.items() if k != "ttl"}
        return part
    if kind == "image":
        source = block.get("source") or {}
        if source.get("type") == "base64":
            url = f"data:{source.get('media_type') or 'image/png'};base64,{source.get('data') or ''}"
        else:
            url = str(source.get("url") or "")
        return {"type": "image_url", "image_url": {"url": url}}
    return None


def _content(content: Any, keep_cache: bool) -> Any:
    if isinstance(content, str):
        return content
    parts = [p for b in content or [] if isinstance(b, dict) and (p := _part(b, keep_cache)) is not None]
    if not keep_cache and all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _tool_result_text(block: dict[str, Any]) -> str:
    content = block.get("content")
    text = content if isinstance(content, str) else "".join(
        str(b.get("text") or "") for b in content or [] if isinstance(b, dict) and b.get("type") == "text")
    # OpenAI's tool message has no error flag: the model reads it in the text.
    return f"Error: {text}" if block.get("is_error") else text


def _turn(msg: dict[str, Any], keep_cache: bool) -> list[dict[str, Any]]:
    role, content = msg.get("role"), msg.get("content")
    if role == "system":  # Claude Code sometimes sends one inside messages
        return [{"role": "system", "content": _content(content, False)}]
    blocks = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
    if role == "assistant":
        text = "".join(str(b.get("text") or "") for b in blocks if isinstance(b, dict) and b.get("type") == "text")
        calls = [{"id": b.get("id") or "", "type": "function",
                  "function": {"name": b.get("name") or "", "arguments": orjson.dumps(b.get("input") or {}).decode()}}
                 for b in blocks if isinstance(b, dict) and b.get("type") == "tool_use"]
        out: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            out["tool_calls"] = calls
        return [out] if text or calls else []
    turns = [{"role": "tool", "tool_call_id": b.get("tool_use_id") or "", "content": _tool_result_text(b)}
             for b in blocks if isinstance(b, dict) and b.get("type") == "tool_result"]
    rest = [b for b in blocks if isinstance(b, dict) and b.get("type") != "tool_result"]
    if rest or not turns:
        turns.append({"role": "user", "content": _content(rest if isinstance(content, list) else content,
                                                          keep_cache)})
    return turns


def _tool_choice(choice: Any) -> Any:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "any":
        return "required"
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name") or ""}}
    return kind  # auto, none (or None: unset)


def messages_to_chat(body: dict[str, Any], keep_cache: bool = False, effort: bool = False) -> dict[str, Any]:
    """An OpenAI chat completions body for an Anthropic Messages request (a new dict). ``effort``:
    the upstream model takes ``reasoning_effort`` (the catalog candidate's ``thinking: effort``)."""
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": _content(system, keep_cache)})
    for msg in body.get("messages") or []:
        if isinstance(msg, dict):
            messages.extend(_turn(msg, keep_cache))
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages, "max_tokens": body.get("max_tokens")}
    wanted = reasoning_effort(body) if effort else None
    if wanted is not None:
        chat["reasoning_effort"] = wanted
        # OpenAI's reasoning models refuse max_tokens; max_completion_tokens counts the reasoning too,
        # as Anthropic's max_tokens counts the thinking.
        chat["max_completion_tokens"] = chat.pop("max_tokens")
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            chat[key] = body[key]
    if body.get("stop_sequences"):
        chat["stop"] = list(body["stop_sequences"])[:4]
    tools = [{"type": "function", "function": {k: v for k, v in (("name", t.get("name")),
                                                                ("description", t.get("description")),
                                                                ("parameters", t.get("input_schema"))) if v}}
             for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") in (None, "custom")]
    if tools:
        chat["tools"] = tools
        choice = body.get("tool_choice")
        if _tool_choice(choice):
            chat["tool_choice"] = _tool_choice(choice)
        if isinstance(choice, dict) and choice.get("disable_parallel_tool_use"):
            chat["parallel_tool_calls"] = False
    user = (body.get("metadata") or {}).get("user_id") if isinstance(body.get("metadata"), dict) else None
    if isinstance(user, str):
        chat["user"] = user[:256]
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def _arguments(raw: Any) -> Any:
    try:
        value = orjson.loads(raw) if isinstance(raw, str) and raw else {}
    except orjson.JSONDecodeError:
        return {"_raw": raw}
    return value if isinstance(value, dict) else {"value": value}


def _thinking(message: dict[str, Any]) -> list[dict[str, Any]]:
    """Thinking blocks for a chat answer's reasoning: an Anthropic front's signed blocks as they
    are (thinking.py's request side keeps Anthropic's own fields), else the reasoning text in an
    unsigned block (another model's reasoning carries no signature)."""
    blocks = request_blocks(message)
    if blocks:
        return blocks
    text = message.get("reasoning_content") or message.get("reasoning")
    return [{"type": "thinking", "thinking": text, "signature": ""}] if isinstance(text, str) and text else []


def chat_to_message(chat: dict[str, Any], model: Any) -> tuple[dict[str, Any], Usage | None]:
    """An Anthropic message for a whole chat.completion answer, and its usage."""
    choice = (chat.get("choices") or [{}])[0] or {}
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = _thinking(message)
    if message.get("content"):
        content.append({"type": "text", "text": str(message["content"])})
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or "toolu_" + uuid.uuid4().hex[:24],
                        "name": fn.get("name") or "", "input": _arguments(fn.get("arguments"))})
    usage = Usage.from_openai(chat.get("usage"))
    answer = {"id": "msg_" + str(chat.get("id") or uuid.uuid4().hex), "type": "message", "role": "assistant",
              "model": model or chat.get("model"), "content": content,
              "stop_reason": STOP_REASONS.get(choice.get("finish_reason") or "stop", "end_turn"),
              "stop_sequence": None, "usage": (usage or Usage()).anthropic()}
    return answer, usage
