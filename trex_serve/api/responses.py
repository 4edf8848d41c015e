"""OpenAI Responses API ↔ chat completions, whole bodies, as pure functions, for chat-only providers.

`responses_to_chat` maps a `/v1/responses` request body to a chat completions body (a new dict) and
`chat_to_response` maps a whole chat.completion back to a `response` object. The item and `response`
builders here are shared with the stream translation (`responses_stream.py`)."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import orjson

from trex_serve.providers.usage import Usage

_TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesInputError(ValueError):
    """A Responses request this translation cannot express as a chat request."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ---- request ----------------------------------------------------------------------------------


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text") or p.get("refusal") or "") for p in content
                       if isinstance(p, dict) and p.get("type") in (*_TEXT_PARTS, "refusal"))
    return "" if content is None else str(content)


def _parts(content: Any) -> Any:
    """Chat content for a user message: a string, or chat parts for text and images."""
    if not isinstance(content, list):
        return content if isinstance(content, str) else _text(content)
    out: list[dict[str, Any]] = []
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in _TEXT_PARTS:
            out.append({"type": "text", "text": str(part.get("text") or "")})
        elif kind == "input_image":
            url = part.get("image_url")
            if not url:
                raise ResponsesInputError("input_image needs an image_url (file ids are not supported)",
                                          "input")
            image: dict[str, Any] = {"url": url}
            if part.get("detail"):
                image["detail"] = part["detail"]
            out.append({"type": "image_url", "image_url": image})
        else:
            raise ResponsesInputError(f"input content of type {kind!r} is not supported", "input")
    return out


# A reasoning item's encrypted_content, when the reasoning came from an Anthropic model: its thinking
# blocks (signatures, redacted data) as the client must send them back. Opaque to the client, as
# OpenAI's own encrypted reasoning is; Anthropic checks the signatures itself.
_BLOCKS_PREFIX = "trex.thinking.v1:"


def encode_thinking(blocks: list[dict[str, Any]]) -> str:
    return _BLOCKS_PREFIX + base64.urlsafe_b64encode(orjson.dumps(blocks)).decode()


def decode_thinking(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, str) or not value.startswith(_BLOCKS_PREFIX):
        return []  # OpenAI's own encrypted reasoning means nothing to another provider
    try:
        blocks = orjson.loads(base64.urlsafe_b64decode(value[len(_BLOCKS_PREFIX):]))
    except (ValueError, orjson.JSONDecodeError):
        raise ResponsesInputError("reasoning item encrypted_content is damaged", "input") from None
    return [b for b in blocks if isinstance(b, dict)] if isinstance(blocks, list) else []


def reasoning_item(item_id: str, text: str, blocks: list[dict[str, Any]], status: str) -> dict[str, Any]:
    item: dict[str, Any] = {"id": item_id, "type": "reasoning", "status": status,
                            "summary": [{"type": "summary_text", "text": text}] if text else []}
    if blocks:
        item["encrypted_content"] = encode_thinking(blocks)
    return item


def _items(items: list[Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    thinking: list[dict[str, Any]] = []  # from reasoning items, for the assistant turn that follows
    for item in items:
        if not isinstance(item, dict):
            raise ResponsesInputError("input items must be objects", "input")
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role == "user":
                messages.append({"role": "user", "content": _parts(item.get("content"))})
            elif role in ("system", "developer", "assistant"):
                messages.append({"role": role, "content": _text(item.get("content"))})
                if role == "assistant" and thinking:
                    messages[-1]["thinking_blocks"], thinking = thinking, []
            else:
                raise ResponsesInputError(f"unknown message role {role!r}", "input")
        elif kind == "function_call":
            name = item.get("name") or ""
            if item.get("namespace"):  # a namespaced tool's call, as the flattened function it was
                name = f"{item['namespace']}{NAMESPACE_SEP}{name}"
            call = {"id": item.get("call_id") or item.get("id") or "", "type": "function",
                    "function": {"name": name, "arguments": item.get("arguments") or ""}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            if thinking:
                messages[-1].setdefault("thinking_blocks", []).extend(thinking)
                thinking = []
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id") or "",
                             "content": output if isinstance(output, str) else _text(output)})
        elif kind == "reasoning":
            # An Anthropic model's signed thinking rides along to the assistant turn it preceded;
            # a summary alone has no chat equivalent and is dropped.
            thinking.extend(decode_thinking(item.get("encrypted_content")))
        else:
            raise ResponsesInputError(f"input items of type {kind!r} are not supported", "input")
    return messages


# A namespace tool's functions reach a chat provider as "<namespace>__<function>"; calls of them are
# mapped back to {name, namespace} for the client (only for namespaces the request declared).
NAMESPACE_SEP = "__"
# Hosted tools a chat provider has no equivalent of, which clients such as Codex always offer: the
# model is served without them (docs/CLIENTS.md). Any other hosted tool is refused by name.
_OPTIONAL_HOSTED = ("web_search", "web_search_preview")


def _chat_function(tool: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
    fn["name"] = prefix + str(fn.get("name") or "")
    return {"type": "function", "function": fn}


def _chat_tools(tools: list[Any]) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else tool
        if kind == "function":
            out.append(_chat_function(tool))
        elif kind == "namespace":
            prefix = f"{tool.get('name') or ''}{NAMESPACE_SEP}"
            out.extend(_chat_function(t, prefix) for t in tool.get("tools") or []
                       if isinstance(t, dict) and t.get("type") == "function")
        elif kind not in _OPTIONAL_HOSTED:
            raise ResponsesInputError(f"tools[{i}]: tools of type {kind!r} are not supported by this model "
                                      f"(no provider of it serves the Responses API natively)", f"tools[{i}]")
    return out


def split_namespace(name: str, request: dict[str, Any]) -> dict[str, str]:
    """``name`` (and ``namespace``) of a function call item, for a flattened namespaced function."""
    ns, sep, fn = name.partition(NAMESPACE_SEP)
    if sep and any(isinstance(t, dict) and t.get("type") == "namespace" and t.get("name") == ns
                   for t in request.get("tools") or []):
        return {"name": fn, "namespace": ns}
    return {"name": name}


def _chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def responses_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A chat completions body for a Responses request body. Never mutates `body`."""
    if body.get("previous_response_id"):
        raise ResponsesInputError("previous_response_id is not supported; send the conversation in input",
                                  "previous_response_id")
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    elif isinstance(instructions, list):
        messages.extend(_items(instructions))
    given = body.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    elif isinstance(given, list):
        messages.extend(_items(given))
    elif given is not None:
        raise ResponsesInputError("input must be a string or a list of items", "input")
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for key in ("temperature", "top_p", "user", "parallel_tool_calls", "trex"):
        if body.get(key) is not None:
            chat[key] = body[key]
    if body.get("tools"):
        chat["tools"] = _chat_tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _chat_tool_choice(body["tool_choice"])
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    effort = (body.get("reasoning") or {}).get("effort") if isinstance(body.get("reasoning"), dict) else None
    if effort:
        chat["reasoning_effort"] = effort
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # response.completed carries usage
    return chat


# ---- response ---------------------------------------------------------------------------------


def responses_usage(usage: Any) -> dict[str, Any] | None:
    """A chat completion's usage in the Responses API's fields, token classes kept."""
    record = Usage.from_openai(usage)
    return record.openai_responses() if record is not None else None


def _echo_tools(request: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"type": "function", "name": t.get("name") or "", "description": t.get("description"),
             "parameters": t.get("parameters"), "strict": t.get("strict")}
            for t in request.get("tools") or [] if isinstance(t, dict) and t.get("type") == "function"]


def response_object(resp_id: str, created: float, model: Any, request: dict[str, Any], status: str,
              output: list[dict[str, Any]], usage: dict[str, Any] | None = None,
              error: dict[str, Any] | None = None, incomplete: str | None = None) -> dict[str, Any]:
    return {
        "id": resp_id, "object": "response", "created_at": created, "status": status,
        "model": model or request.get("model") or "", "output": output,
        "error": error, "incomplete_details": {"reason": incomplete} if incomplete else None,
        "instructions": request.get("instructions"), "metadata": request.get("metadata") or {},
        "max_output_tokens": request.get("max_output_tokens"),
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "temperature": request.get("temperature"), "top_p": request.get("top_p"),
        "tool_choice": request.get("tool_choice") or "auto", "tools": _echo_tools(request),
        "previous_response_id": None, "text": request.get("text") or {"format": {"type": "text"}},
        "truncation": "disabled", "user": request.get("user"), "usage": usage,
    }


def message_item(item_id: str, text: str, status: str, refusal: str | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if text or refusal is None:
        content.append({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    if refusal:
        content.append({"type": "refusal", "refusal": refusal})
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str,
              request: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id,
            **split_namespace(name, request or {}), "arguments": arguments, "status": status}


def chat_to_response(chat_json: bytes | dict[str, Any], request_body: dict[str, Any]) -> dict[str, Any]:
    """A Responses `response` object for a whole chat.completion answer."""
    chat = orjson.loads(chat_json) if isinstance(chat_json, bytes | bytearray | str) else chat_json
    if not isinstance(chat, dict):
        raise ValueError("chat completion is not a JSON object")
    choices = chat.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    blocks = message.get("thinking_blocks") if isinstance(message.get("thinking_blocks"), list) else []
    if message.get("reasoning_content") or blocks:
        output.append(reasoning_item(new_id("rs"), str(message.get("reasoning_content") or ""), blocks,
                                     "completed"))
    text = message.get("content") or ""
    if text or message.get("refusal"):
        output.append(message_item(new_id("msg"), text, "completed", message.get("refusal")))
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        output.append(call_item(new_id("fc"), call.get("id") or "", fn.get("name") or "",
                                 fn.get("arguments") or "", "completed", request_body))
    if not output:
        output.append(message_item(new_id("msg"), "", "completed"))
    finish = choice.get("finish_reason")
    incomplete = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(finish or "")
    return response_object(new_id("resp"), float(chat.get("created") or time.time()), chat.get("model"),
                     request_body, "incomplete" if incomplete else "completed", output,
                     responses_usage(chat.get("usage")), incomplete=incomplete)
