"""OpenAI chat completions ↔ Anthropic Messages (`format: anthropic`).

The client speaks OpenAI chat; the upstream speaks `POST {base_url}/messages`. `build` maps the
request, `translate_response` maps a whole answer back, `AnthropicStream` maps the typed Anthropic
SSE events to chat.completion.chunk events as they arrive, and `translate_error` reads Anthropic's
error envelope. Nothing here mutates the caller's body, so a fallback can translate it again."""

from __future__ import annotations

import time
from typing import Any

import orjson

from trex_serve.admission.tokens import CHARS_PER_TOKEN
from trex_serve.catalog import Provider
from trex_serve.providers.base import UpstreamCall, Usage, register
from trex_serve.providers.sse import EventSplitter, data_of, usage_comment

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
        blocks = _blocks(msg.get("content"))
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


def to_anthropic(body: dict[str, Any], upstream_model: str, stream: bool) -> dict[str, Any]:
    """The Anthropic Messages request for an OpenAI chat completions body (a new dict)."""
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
    if stream:
        out["stream"] = True
    return out


# ---- response: Anthropic message → OpenAI chat.completion -------------------------------------


def _usage_numbers(usage: Any) -> tuple[int, int, int] | None:
    """(prompt, completion, cached) of an Anthropic usage object; prompt includes cache tokens."""
    if not isinstance(usage, dict):
        return None
    inp, out = usage.get("input_tokens"), usage.get("output_tokens")
    if not isinstance(inp, int) and not isinstance(out, int):
        return None
    cached = int(usage.get("cache_read_input_tokens") or 0)
    prompt = int(inp or 0) + int(usage.get("cache_creation_input_tokens") or 0) + cached
    return prompt, int(out or 0), cached


def _openai_usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


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
                               "refusal": None}
    if calls:
        message["tool_calls"] = calls
    answer: dict[str, Any] = {
        "id": str(data.get("id") or "msg"), "object": "chat.completion", "created": int(time.time()),
        "model": data.get("model"),
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": finish_reason(data.get("stop_reason")) or "stop"}],
    }
    numbers = _usage_numbers(data.get("usage"))
    if numbers is None:
        return answer, None
    answer["usage"] = _openai_usage(*numbers)
    return answer, Usage(numbers[0], numbers[1])


# ---- streaming --------------------------------------------------------------------------------


class AnthropicStream:
    """Anthropic message events in, chat.completion.chunk events out (one translator per stream)."""

    def __init__(self, want_usage: bool, model: str) -> None:
        self.want_usage = want_usage
        self.usage: Usage | None = None
        self.delivered_chars = 0
        self._split = EventSplitter()
        self._id = "msg"
        self._model = model
        self._created = int(time.time())
        self._prompt = 0
        self._completion = 0
        self._cached = 0
        self._final_usage = False
        self._tools: dict[int, int] = {}  # Anthropic block index → OpenAI tool_calls index
        self._done = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        obj = {"id": self._id, "object": "chat.completion.chunk", "created": self._created,
               "model": self._model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                  "logprobs": None}]}
        return b"data: " + orjson.dumps(obj)

    def _take_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        if isinstance(usage.get("input_tokens"), int):
            numbers = _usage_numbers(usage)
            if numbers is not None:
                self._prompt, self._cached = numbers[0], numbers[2]
        if isinstance(usage.get("output_tokens"), int):
            self._completion = usage["output_tokens"]  # cumulative in Anthropic's events

    def _event(self, event: bytes) -> bytes | None:
        data = data_of(event)
        if not data:
            return None
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict):
            return None
        kind = obj.get("type")
        if kind == "message_start":
            msg = obj.get("message") or {}
            self._id = str(msg.get("id") or self._id)
            self._model = msg.get("model") or self._model
            self._take_usage(msg.get("usage"))
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start":
            block = obj.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = self._tools.setdefault(int(obj.get("index") or 0), len(self._tools))
                self.delivered_chars += len(block.get("name") or "")
                return self._chunk({"tool_calls": [{"index": index, "id": block.get("id") or "",
                                                    "type": "function",
                                                    "function": {"name": block.get("name") or "",
                                                                 "arguments": ""}}]})
            if block.get("type") == "text" and block.get("text"):
                self.delivered_chars += len(block["text"])
                return self._chunk({"content": block["text"]})
            return None
        if kind == "content_block_delta":
            delta = obj.get("delta") or {}
            if delta.get("type") == "text_delta":
                text = str(delta.get("text") or "")
                self.delivered_chars += len(text)
                return self._chunk({"content": text}) if text else None
            if delta.get("type") == "input_json_delta":
                index = self._tools.get(int(obj.get("index") or 0))
                part = str(delta.get("partial_json") or "")
                if index is None or not part:
                    return None
                self.delivered_chars += len(part)
                return self._chunk({"tool_calls": [{"index": index, "function": {"arguments": part}}]})
            return None  # thinking / signature deltas are not part of the chat schema
        if kind == "message_delta":
            self._take_usage(obj.get("usage"))
            self._final_usage = self._final_usage or isinstance((obj.get("usage") or {}).get("output_tokens"), int)
            reason = finish_reason((obj.get("delta") or {}).get("stop_reason"))
            return self._chunk({}, reason) if reason else None
        if kind == "message_stop":
            self._done = True
            out = []
            if self.want_usage and (self._final_usage or self._prompt):
                usage = {"id": self._id, "object": "chat.completion.chunk", "created": self._created,
                         "model": self._model, "choices": [],
                         "usage": _openai_usage(self._prompt, self._completion, self._cached)}
                out.append(b"data: " + orjson.dumps(usage))
            out.append(b"data: [DONE]")
            return b"\n\n".join(out)
        if kind == "error":
            err = obj.get("error") or {}
            code = str(err.get("type") or "upstream_error")
            body = {"error": {"message": str(err.get("message") or code), "type": "upstream_error",
                              "code": code}}
            return b"data: " + orjson.dumps(body)
        return None  # ping, content_block_stop, unknown future events

    def feed(self, chunk: bytes) -> bytes:
        out = [e for e in (self._event(ev) for ev in self._split.feed(chunk)) if e]
        return b"\n\n".join(out) + b"\n\n" if out else b""

    def finish(self) -> bytes:
        rest = self._split.rest()
        tail = self._event(rest) if rest.strip() else None
        head = tail + b"\n\n" if tail else b""
        if self._final_usage:
            self.usage = Usage(self._prompt, self._completion)
        else:  # cut short: what we saw of the prompt, and an estimate of what was delivered
            self.usage = Usage(self._prompt, max(self._completion, self.delivered_chars // CHARS_PER_TOKEN), True)
        u = self.usage
        return head + usage_comment(u.prompt_tokens, u.completion_tokens, u.estimated)


# ---- the adapter ------------------------------------------------------------------------------


class AnthropicAdapter:
    format = "anthropic"

    def build(self, api: str, body: dict[str, Any], upstream_model: str, stream: bool,
              api_key: str | None, provider: Provider) -> UpstreamCall:
        if api != "chat":
            raise ValueError(f"the anthropic adapter serves the chat API only, not {api!r}")
        headers = {"Content-Type": "application/json", "anthropic-version": ANTHROPIC_VERSION,
                   **provider.headers}
        if api_key:
            headers["x-api-key"] = api_key
        payload = orjson.dumps(to_anthropic(body, upstream_model, stream))
        return UpstreamCall(provider.base_url.rstrip("/") + "/messages", headers, payload)

    def translate_response(self, api: str, body: bytes) -> tuple[bytes, Usage | None]:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ValueError("upstream answered with malformed JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("content"), list):
            raise ValueError("upstream answered with something that is not an Anthropic message")
        answer, usage = to_openai(data)
        return orjson.dumps(answer), usage

    def stream_translator(self, api: str, want_usage: bool, model: str) -> AnthropicStream:
        return AnthropicStream(want_usage, model)

    def translate_error(self, status: int, body: bytes) -> tuple[str, str]:
        default = f"upstream_http_{status}"
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            text = body[:200].decode("utf-8", "replace").strip()
            return default, text or default
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            code = str(err.get("type") or err.get("code") or default)
            return code, str(err.get("message") or code)
        if isinstance(err, str):
            return default, err
        return default, default


register(AnthropicAdapter())
