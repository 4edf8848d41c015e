"""OpenAI Responses API ↔ chat completions, as pure functions, for providers that only speak chat.

`responses_to_chat` maps a `/v1/responses` request body to a chat completions body (a new dict),
`chat_to_response` maps a whole chat.completion back to a `response` object, and `ResponsesStream`
turns chat.completion.chunk SSE into the typed Responses SSE events (`response.created` ...
`response.completed`) the official SDKs parse. SSE comments (the `: trex-usage` settlement
trailer) pass through the stream translation untouched."""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from trex_serve.providers.sse import EventSplitter, data_of

_TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesInputError(ValueError):
    """A Responses request this translation cannot express as a chat request."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _new_id(prefix: str) -> str:
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


def _items(items: list[Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
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
            else:
                raise ResponsesInputError(f"unknown message role {role!r}", "input")
        elif kind == "function_call":
            call = {"id": item.get("call_id") or item.get("id") or "", "type": "function",
                    "function": {"name": item.get("name") or "", "arguments": item.get("arguments") or ""}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id") or "",
                             "content": output if isinstance(output, str) else _text(output)})
        elif kind == "reasoning":
            continue  # reasoning summaries have no chat equivalent; dropping them is harmless
        else:
            raise ResponsesInputError(f"input items of type {kind!r} are not supported", "input")
    return messages


def _chat_tools(tools: list[Any]) -> list[dict[str, Any]]:
    out = []
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else tool
            raise ResponsesInputError(f"tools of type {kind!r} are not supported by this model", "tools")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


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


def _usage(usage: Any) -> dict[str, Any] | None:
    if not isinstance(usage, dict):
        return None
    inp = int(usage.get("prompt_tokens") or 0)
    out = int(usage.get("completion_tokens") or 0)
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    reasoning = int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
    return {"input_tokens": inp, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": out, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": int(usage.get("total_tokens") or inp + out)}


def _echo_tools(request: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"type": "function", "name": t.get("name") or "", "description": t.get("description"),
             "parameters": t.get("parameters"), "strict": t.get("strict")}
            for t in request.get("tools") or [] if isinstance(t, dict) and t.get("type") == "function"]


def _response(resp_id: str, created: float, model: Any, request: dict[str, Any], status: str,
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


def _message_item(item_id: str, text: str, status: str, refusal: str | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if text or refusal is None:
        content.append({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    if refusal:
        content.append({"type": "refusal", "refusal": refusal})
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def chat_to_response(chat_json: bytes | dict[str, Any], request_body: dict[str, Any]) -> dict[str, Any]:
    """A Responses `response` object for a whole chat.completion answer."""
    chat = orjson.loads(chat_json) if isinstance(chat_json, bytes | bytearray | str) else chat_json
    if not isinstance(chat, dict):
        raise ValueError("chat completion is not a JSON object")
    choices = chat.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    text = message.get("content") or ""
    if text or message.get("refusal"):
        output.append(_message_item(_new_id("msg"), text, "completed", message.get("refusal")))
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        output.append(_call_item(_new_id("fc"), call.get("id") or "", fn.get("name") or "",
                                 fn.get("arguments") or "", "completed"))
    if not output:
        output.append(_message_item(_new_id("msg"), "", "completed"))
    finish = choice.get("finish_reason")
    incomplete = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(finish or "")
    return _response(_new_id("resp"), float(chat.get("created") or time.time()), chat.get("model"),
                     request_body, "incomplete" if incomplete else "completed", output,
                     _usage(chat.get("usage")), incomplete=incomplete)


# ---- streaming --------------------------------------------------------------------------------


class ResponsesStream:
    """chat.completion.chunk SSE in, typed Responses SSE events out (one per stream)."""

    def __init__(self, request_body: dict[str, Any]) -> None:
        self.request = request_body
        self.id = _new_id("resp")
        self.created = time.time()
        self.model: Any = request_body.get("model")
        self._split = EventSplitter()
        self._seq = 0
        self._started = False
        self._ended = False
        self._output: list[dict[str, Any]] = []   # finished items, by output_index
        self._message: dict[str, Any] | None = None  # the open message: id, index, text
        self._calls: dict[int, dict[str, Any]] = {}  # chat tool_call index → open function call
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None

    # -- event writing

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def _snapshot(self, status: str, **extra: Any) -> dict[str, Any]:
        return _response(self.id, self.created, self.model, self.request, status,
                         [item for item in self._output if item is not None], **extra)

    def _start(self) -> bytes:
        self._started = True
        return (self._event("response.created", response=self._snapshot("in_progress"))
                + self._event("response.in_progress", response=self._snapshot("in_progress")))

    def _open_message(self) -> bytes:
        index = len(self._output)
        self._output.append(None)  # type: ignore[arg-type]  (reserved until done)
        self._message = {"id": _new_id("msg"), "index": index, "text": []}
        m = self._message
        return (self._event("response.output_item.added", output_index=index,
                            item=_message_item(m["id"], "", "in_progress") | {"content": []})
                + self._event("response.content_part.added", item_id=m["id"], output_index=index,
                              content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                                     "logprobs": []}))

    def _close_message(self) -> bytes:
        m, self._message = self._message, None
        if m is None:
            return b""
        text = "".join(m["text"])
        item = _message_item(m["id"], text, "completed")
        self._output[m["index"]] = item
        return (self._event("response.output_text.done", item_id=m["id"], output_index=m["index"],
                            content_index=0, text=text, logprobs=[])
                + self._event("response.content_part.done", item_id=m["id"], output_index=m["index"],
                              content_index=0, part=item["content"][0])
                + self._event("response.output_item.done", output_index=m["index"], item=item))

    def _close_calls(self) -> bytes:
        out = b""
        for call in self._calls.values():
            args = "".join(call["args"])
            item = _call_item(call["id"], call["call_id"], call["name"], args, "completed")
            self._output[call["index"]] = item
            out += (self._event("response.function_call_arguments.done", item_id=call["id"],
                                output_index=call["index"], arguments=args)
                    + self._event("response.output_item.done", output_index=call["index"], item=item))
        self._calls = {}
        return out

    # -- chat chunks

    def _chunk(self, obj: dict[str, Any]) -> bytes:
        out = b"" if self._started else self._start()
        if obj.get("model"):
            self.model = obj["model"]
        if isinstance(obj.get("usage"), dict):
            self._usage = _usage(obj["usage"])
        for choice in obj.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                if self._message is None:
                    out += self._open_message()
                m = self._message
                assert m is not None
                m["text"].append(text)
                out += self._event("response.output_text.delta", item_id=m["id"], output_index=m["index"],
                                   content_index=0, delta=text, logprobs=[])
            for tc in delta.get("tool_calls") or []:
                out += self._tool_delta(tc)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return out

    def _tool_delta(self, tc: dict[str, Any]) -> bytes:
        out = b""
        index = int(tc.get("index") or 0)
        fn = tc.get("function") or {}
        call = self._calls.get(index)
        if call is None:
            out += self._close_message()
            call = {"id": _new_id("fc"), "index": len(self._output), "call_id": tc.get("id") or "",
                    "name": fn.get("name") or "", "args": []}
            self._output.append(None)  # type: ignore[arg-type]
            self._calls[index] = call
            out += self._event("response.output_item.added", output_index=call["index"],
                               item=_call_item(call["id"], call["call_id"], call["name"], "", "in_progress"))
        if fn.get("arguments"):
            call["args"].append(fn["arguments"])
            out += self._event("response.function_call_arguments.delta", item_id=call["id"],
                               output_index=call["index"], delta=fn["arguments"])
        return out

    def _complete(self) -> bytes:
        self._ended = True
        out = (b"" if self._started else self._start()) + self._close_message() + self._close_calls()
        incomplete = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(self._finish or "")
        if incomplete:
            return out + self._event("response.incomplete", response=self._snapshot(
                "incomplete", usage=self._usage, incomplete=incomplete))
        return out + self._event("response.completed", response=self._snapshot("completed", usage=self._usage))

    def _fail(self, code: str, message: str) -> bytes:
        self._ended = True
        out = (b"" if self._started else self._start()) + self._close_message() + self._close_calls()
        error = {"code": "rate_limit_exceeded" if "rate_limit" in code else "server_error",
                 "message": message, "type": code}
        return (out + self._event("error", code=code, message=message, param=None)
                + self._event("response.failed", response=self._snapshot("failed", usage=self._usage,
                                                                         error=error)))

    def _handle(self, event: bytes) -> bytes:
        if event.startswith(b":"):
            return event + b"\n\n"  # comments (the settlement trailer) pass through
        if self._ended:
            return b""
        data = data_of(event)
        if data is None:
            return b""
        if data.strip() == b"[DONE]":
            return self._complete()
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return b""
        if not isinstance(obj, dict):
            return b""
        if isinstance(obj.get("error"), dict):
            err = obj["error"]
            return self._fail(str(err.get("code") or err.get("type") or "server_error"),
                              str(err.get("message") or "upstream error"))
        return self._chunk(obj)

    def feed(self, chunk: bytes) -> bytes:
        return b"".join(self._handle(e) for e in self._split.feed(chunk))

    def finish(self) -> bytes:
        rest = self._split.rest()
        out = self._handle(rest) if rest.strip() else b""
        if not self._ended:
            out += self._fail("upstream_stream_interrupted", "the upstream stream ended early")
        return out
