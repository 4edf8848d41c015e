"""chat.completion.chunk SSE → the typed Responses SSE events (`response.created` ... `response.completed`).

One `ResponsesStream` per answer turns the chat chunks into the events the official SDKs parse,
building its items with the same helpers as the whole-answer mapping (`responses.py`). SSE comments
(the `: trex-usage` settlement trailer) pass through untouched."""

from __future__ import annotations

import time
from typing import Any

import orjson

from trex_serve.api.responses import (
    call_item,
    message_item,
    new_id,
    reasoning_item,
    response_object,
    responses_usage,
)
from trex_serve.providers.sse import DONE, EventSplitter, chat_event


class ResponsesStream:
    """chat.completion.chunk SSE in, typed Responses SSE events out (one per stream)."""

    def __init__(self, request_body: dict[str, Any]) -> None:
        self.request = request_body
        self.id = new_id("resp")
        self.created = time.time()
        self.model: Any = request_body.get("model")
        self._split = EventSplitter()
        self._seq = 0
        self._started = False
        self._ended = False
        self._output: list[dict[str, Any]] = []   # finished items, by output_index
        self._message: dict[str, Any] | None = None  # the open message: id, index, text
        self._reasoning: dict[str, Any] | None = None  # the open reasoning item: id, index, text, blocks
        self._calls: dict[int, dict[str, Any]] = {}  # chat tool_call index → open function call
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None

    # -- event writing

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def _snapshot(self, status: str, **extra: Any) -> dict[str, Any]:
        return response_object(self.id, self.created, self.model, self.request, status,
                         [item for item in self._output if item is not None], **extra)

    def _start(self) -> bytes:
        self._started = True
        return (self._event("response.created", response=self._snapshot("in_progress"))
                + self._event("response.in_progress", response=self._snapshot("in_progress")))

    def _open_message(self) -> bytes:
        index = len(self._output)
        self._output.append(None)  # type: ignore[arg-type]  (reserved until done)
        self._message = {"id": new_id("msg"), "index": index, "text": []}
        m = self._message
        return (self._event("response.output_item.added", output_index=index,
                            item=message_item(m["id"], "", "in_progress") | {"content": []})
                + self._event("response.content_part.added", item_id=m["id"], output_index=index,
                              content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                                     "logprobs": []}))

    def _open_reasoning(self) -> bytes:
        index = len(self._output)
        self._output.append(None)  # type: ignore[arg-type]
        r = self._reasoning = {"id": new_id("rs"), "index": index, "text": [], "blocks": []}
        return self._event("response.output_item.added", output_index=index,
                           item=reasoning_item(r["id"], "", [], "in_progress"))

    def _reasoning_delta(self, text: str | None, blocks: Any) -> bytes:
        out = b"" if self._reasoning is not None else self._open_reasoning()
        r = self._reasoning
        assert r is not None
        if text:
            if not r["text"]:
                out += self._event("response.reasoning_summary_part.added", item_id=r["id"],
                                   output_index=r["index"], summary_index=0,
                                   part={"type": "summary_text", "text": ""})
            r["text"].append(text)
            out += self._event("response.reasoning_summary_text.delta", item_id=r["id"],
                               output_index=r["index"], summary_index=0, delta=text)
        if isinstance(blocks, list):  # the stream's index is a delta position, not part of the block
            r["blocks"].extend({k: v for k, v in b.items() if k != "index"} for b in blocks if isinstance(b, dict))
        return out

    def _close_reasoning(self) -> bytes:
        r, self._reasoning = self._reasoning, None
        if r is None:
            return b""
        text = "".join(r["text"])
        item = reasoning_item(r["id"], text, r["blocks"], "completed")
        self._output[r["index"]] = item
        out = b""
        if text:
            out += (self._event("response.reasoning_summary_text.done", item_id=r["id"], output_index=r["index"],
                                summary_index=0, text=text)
                    + self._event("response.reasoning_summary_part.done", item_id=r["id"],
                                  output_index=r["index"], summary_index=0, part=item["summary"][0]))
        return out + self._event("response.output_item.done", output_index=r["index"], item=item)

    def _close_message(self) -> bytes:
        m, self._message = self._message, None
        if m is None:
            return b""
        text = "".join(m["text"])
        item = message_item(m["id"], text, "completed")
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
            item = call_item(call["id"], call["call_id"], call["name"], args, "completed", self.request)
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
            self._usage = responses_usage(obj["usage"])
        for choice in obj.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content") or delta.get("thinking_blocks"):
                out += self._reasoning_delta(delta.get("reasoning_content"), delta.get("thinking_blocks"))
            text = delta.get("content")
            if text:
                if self._message is None:
                    out += self._close_reasoning() + self._open_message()
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
            out += self._close_reasoning() + self._close_message()
            call = {"id": new_id("fc"), "index": len(self._output), "call_id": tc.get("id") or "",
                    "name": fn.get("name") or "", "args": []}
            self._output.append(None)  # type: ignore[arg-type]
            self._calls[index] = call
            out += self._event("response.output_item.added", output_index=call["index"],
                               item=call_item(call["id"], call["call_id"], call["name"], "", "in_progress",
                                              self.request))
        if fn.get("arguments"):
            call["args"].append(fn["arguments"])
            out += self._event("response.function_call_arguments.delta", item_id=call["id"],
                               output_index=call["index"], delta=fn["arguments"])
        return out

    def _complete(self) -> bytes:
        self._ended = True
        out = ((b"" if self._started else self._start()) + self._close_reasoning() + self._close_message()
               + self._close_calls())
        incomplete = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(self._finish or "")
        if incomplete:
            return out + self._event("response.incomplete", response=self._snapshot(
                "incomplete", usage=self._usage, incomplete=incomplete))
        return out + self._event("response.completed", response=self._snapshot("completed", usage=self._usage))

    def _fail(self, code: str, message: str) -> bytes:
        self._ended = True
        out = ((b"" if self._started else self._start()) + self._close_reasoning() + self._close_message()
               + self._close_calls())
        error = {"code": "rate_limit_exceeded" if "rate_limit" in code else "server_error",
                 "message": message, "type": code}
        return (out + self._event("error", code=code, message=message, param=None)
                + self._event("response.failed", response=self._snapshot("failed", usage=self._usage,
                                                                         error=error)))

    def _handle(self, event: bytes) -> bytes:
        if event.startswith(b":"):
            return event + b"\n\n"  # comments (the settlement trailer) pass through
        obj = None if self._ended else chat_event(event)
        if obj is DONE:
            return self._complete()
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
