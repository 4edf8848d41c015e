"""OpenAI-compatible chat completions: passthrough with the model rewritten and usage read."""

from __future__ import annotations

from typing import Any

import orjson

from trex_serve.catalog import Provider
from trex_serve.providers.anthropic.from_messages import chat_to_message, messages_to_chat
from trex_serve.providers.anthropic.messages_stream import ChatToMessagesStream
from trex_serve.providers.base import (
    AuthStyle,
    ErrorFields,
    UpstreamCall,
    Usage,
    error_fields,
    upstream_call,
)
from trex_serve.providers.sse import EventSplitter, data_of, usage_comment
from trex_serve.providers.usage import CHARS_PER_TOKEN


def _content_chars(event: bytes) -> int:
    """Characters of text a chunk delivered (what a cut stream is billed for), framing excluded."""
    data = data_of(event)
    try:
        obj = orjson.loads(data) if data else None
    except orjson.JSONDecodeError:
        return 0
    if not isinstance(obj, dict):
        return 0
    total = 0
    for choice in obj.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            total += len(delta["content"])
    return total


class OpenAIStream:
    """Relays chunks as they come; drops the usage-only chunk when the client did not ask for it,
    and reports usage (or a count of delivered text) in a trailing comment."""

    def __init__(self, want_usage: bool) -> None:
        self.want_usage = want_usage
        self.usage: Usage | None = None
        self.delivered_chars = 0
        self._split = EventSplitter()

    def feed(self, chunk: bytes) -> bytes:
        events = self._split.feed(chunk)
        if not events:
            return b""
        out = []
        for event in events:
            if b'"usage"' in event:
                data = data_of(event)
                try:
                    obj = orjson.loads(data) if data else None
                except orjson.JSONDecodeError:
                    obj = None
                if isinstance(obj, dict):
                    # A native Responses stream reports usage inside its response.completed event.
                    nested = obj.get("response") if obj.get("type") == "response.completed" else None
                    usage = Usage.from_openai(obj.get("usage") or (nested or {}).get("usage"))
                    if usage is not None:
                        self.usage = usage
                        if not self.want_usage and nested is None:
                            if not obj.get("choices"):
                                continue  # the usage-only chunk we asked for on the client's behalf
                            obj.pop("usage", None)
                            event = b"data: " + orjson.dumps(obj)
            elif b'"content"' in event:
                self.delivered_chars += _content_chars(event)
            out.append(event)
        return b"\n\n".join(out) + b"\n\n" if out else b""

    def finish(self) -> bytes:
        rest = self._split.rest()
        tail = rest + b"\n\n" if rest.strip() else b""
        usage = self.usage or Usage.counted(0, self.delivered_chars // CHARS_PER_TOKEN)
        return tail + usage_comment(usage)


class MessagesStream:
    """Chat chunks read as for the chat route (usage, the settlement trailer), then written in
    Anthropic's stream grammar for a client of the Messages API."""

    def __init__(self, model: str) -> None:
        self._chat = OpenAIStream(want_usage=True)
        self._anthropic = ChatToMessagesStream(model)

    @property
    def usage(self) -> Usage | None:
        return self._chat.usage

    @property
    def delivered_chars(self) -> int:
        return self._chat.delivered_chars

    def feed(self, chunk: bytes) -> bytes:
        return self._anthropic.feed(self._chat.feed(chunk))

    def error_event(self, message: str, code: str = "") -> bytes:
        return self._anthropic.error_event(message, code)

    def finish(self) -> bytes:
        return self._anthropic.feed(self._chat.finish()) + self._anthropic.finish()


class OpenAIChatAdapter:
    format = "openai"
    auth = AuthStyle("Authorization", "Bearer")

    def build(self, api: str, body: dict[str, Any], upstream_model: str, stream: bool,
              api_key: str | None, provider: Provider, *, thinking: str | None = None,
              client_headers: dict[str, str] | None = None, raw: bytes | None = None) -> UpstreamCall:
        if api == "messages":  # Anthropic's Messages API in, chat completions to the provider
            # thinking "effort": the catalog says this upstream model takes reasoning_effort
            body = messages_to_chat(body, keep_cache=provider.cache_control, effort=thinking == "effort")
        out = dict(body)
        out["model"] = upstream_model
        if stream:
            opts = dict(out.get("stream_options") or {})
            opts["include_usage"] = True
            out["stream_options"] = opts
        path = "/responses" if api == "responses" else "/chat/completions"  # messages: chat too
        return upstream_call(provider, path, orjson.dumps(out), api_key,
                             {"Content-Type": "application/json"}, self.auth)

    def translate_response(self, api: str, body: bytes) -> tuple[bytes, Usage | None]:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ValueError("upstream answered with malformed JSON") from None
        if not isinstance(data, dict):
            raise ValueError("upstream answered with a non-object JSON body")
        if api == "messages":
            answer, usage = chat_to_message(data, data.get("model"))
            return orjson.dumps(answer), usage
        return body, Usage.from_openai(data.get("usage"))

    def stream_translator(self, api: str, want_usage: bool, model: str) -> OpenAIStream | MessagesStream:
        if api == "messages":
            return MessagesStream(model)
        return OpenAIStream(want_usage)

    def translate_error(self, status: int, body: bytes) -> ErrorFields:
        return error_fields(status, body)
