"""The answer side of the request path: what a request carries and gets back, and how it ends.

`Call` is one request's state and `Answer` what the HTTP app sends back. The `Answers` mixin turns
the attempt that ended the loop into the client's answer — a whole body (translated back to the
Responses API when it was served over chat), a relayed SSE stream, or an OpenAI-style error after
a non-retryable upstream answer or when every attempt failed — and settles and records every
request exactly once, a stream when it ends or the client goes away. `request_path.py` reads top to
bottom up to the attempts and calls in here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from trex_serve.admission.gate import Gate, Principal, Settlement, Ticket
from trex_serve.admission.tokens import CHARS_PER_TOKEN, estimate_text
from trex_serve.api.responses import chat_to_response
from trex_serve.api.responses_stream import ResponsesStream
from trex_serve.errors import (
    TrexError,
    UpstreamError,
    UpstreamUnavailable,
)
from trex_serve.hop import contract as hop
from trex_serve.observability import tracing
from trex_serve.observability.request_record import RequestRecord
from trex_serve.providers.base import Usage
from trex_serve.providers.sse import parse_usage_comment
from trex_serve.routing.managed_key_caller import KEYS_EXHAUSTED
from trex_serve.routing.resolve import Target

JSON = "application/json"
log = logging.getLogger("trex.answers")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    media_type: str = JSON
    # A whole answer's settlement, already written to the counter store and finishing (its reply,
    # a velocity suspension, the request record) while the answer goes out: the server keeps it
    # counted as work in flight until it is done.
    settling: asyncio.Task | None = None


@dataclass
class Call:
    """One request's state as it moves through the pipeline."""

    request_id: str
    api: str
    client_ip: str
    started: float = field(default_factory=time.monotonic)
    principal: Principal | None = None
    ticket: Ticket | None = None
    model_requested: str = ""
    stream: bool = False
    attempts: list[dict[str, Any]] = field(default_factory=list)
    served: Target | None = None
    ttfb_ms: float | None = None
    answered: float | None = None  # when a whole answer was ready (its record's latency ends there)
    translate: bool = False
    tokens_estimate: int = 0  # prompt + max output: what a managed key's TPM budget reserves
    response_request: dict[str, Any] | None = None
    client_headers: dict[str, str] | None = None  # a Messages client's anthropic-version / -beta
    trace: tracing.RequestTrace | None = None
    cache: str | None = None  # the response cache's verdict, "hit" | "miss", when the request asked it
    keep: Any = None  # stateful.Keeper: what the answer leaves behind (stored response, cache entry)

    def headers(self) -> dict[str, str]:
        h = {"X-Trex-Request-Id": self.request_id, "X-Trex-Attempts": str(len(self.attempts))}
        if self.served is not None:
            h["X-Trex-Upstream-Provider"] = self.served.provider
            h["X-Trex-Upstream-Model"] = self.served.upstream_model
        if self.ticket is not None:
            h["X-Trex-Billing"] = self.ticket.billing
            h.update(self.ticket.headers)
            if self.ticket.downgraded:
                h["X-Trex-Downgraded"] = "1"
        if self.cache is not None:
            h["X-Trex-Cache"] = self.cache
        return h


async def _translated(chunks: AsyncIterator[bytes], translator: ResponsesStream) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        out = translator.feed(chunk)
        if out:
            yield out
    tail = translator.finish()
    if tail:
        yield tail


class Answers:
    """The answer, settlement and record steps of `Pipeline` (a mixin: it needs the gate and the
    record sink)."""

    gate: Gate
    record: Callable[[RequestRecord], None]

    async def _passthrough(self, call: Call, target: Target, resp: hop.HopResponse) -> Answer:
        call.served = target
        try:
            err = orjson.loads(resp.body).get("error", {})
        except (orjson.JSONDecodeError, AttributeError):
            err = {}
        if not isinstance(err, dict):
            err = {}
        # A null code stays null (the provider sent none); only a body without one says which status.
        code = _text(err.get("code")) if "code" in err else f"upstream_http_{resp.status}"
        exc = UpstreamError(_text(err.get("message")) or f"upstream returned {resp.status}",
                            status=resp.status, type=_text(err.get("type")), code=code,
                            param=_text(err.get("param")))
        await self._settle_failure(call)
        return self._error(call, exc)

    async def _all_failed(self, call: Call, last: hop.HopResponse | None) -> Answer:
        status = 502 if call.attempts else 503
        headers = {}
        if last is not None and last.retry_after:
            headers["Retry-After"] = str(max(1, int(last.retry_after)))
        message = f"All {len(call.attempts)} upstream attempt(s) failed."
        if not call.attempts and last is not None and last.failure == KEYS_EXHAUSTED:
            message = "Every managed key of the providers for this model is cooling down or at its budget."
        exc = UpstreamUnavailable(message, status=status, headers=headers)
        await self._settle_failure(call)
        return self._error(call, exc)

    # ---- answers ------------------------------------------------------------------------------

    async def _success(self, call: Call, resp: hop.HopResponse) -> Answer:
        if resp.chunks is None:
            call.ttfb_ms = (time.monotonic() - call.started) * 1000
            usage = Usage.from_header(resp.headers.get(hop.H_USAGE)) or Usage.counted(
                call.ticket.prompt_estimate if call.ticket else 0, estimate_text(resp.body))
            body = resp.body
            if call.translate:
                body = orjson.dumps(chat_to_response(body, call.response_request or {}))
            call.answered = time.monotonic()
            settling = await self._settle_before_answer(call, usage)
            if call.keep is not None:  # stored and cached before the client can read it
                body = await call.keep.whole(body)
            return Answer(200, call.headers(), body, settling=settling)
        if call.translate:
            resp.chunks = _translated(resp.chunks, ResponsesStream(call.response_request or {}))  # type: ignore[arg-type]
        if call.keep is not None:
            resp.chunks = call.keep.stream(resp.chunks)
        return Answer(200, call.headers(), stream=self._relay(call, resp), media_type="text/event-stream")

    async def _relay(self, call: Call, resp: hop.HopResponse) -> AsyncIterator[bytes]:
        tail = b""
        delivered = 0
        completed = False
        try:
            async for chunk in resp.chunks:  # type: ignore[union-attr]
                if call.ttfb_ms is None:
                    call.ttfb_ms = (time.monotonic() - call.started) * 1000
                delivered += len(chunk)
                tail = (tail + chunk)[-512:]
                yield chunk
            completed = True
        finally:
            if resp.close is not None:
                await resp.close()
            usage = parse_usage_comment(tail)
            if usage is not None:
                if usage.estimated and not usage.prompt_tokens and call.ticket is not None:
                    usage = replace(usage, input_tokens=call.ticket.prompt_estimate)
            else:
                # Cut short (client gone or pool lost): bill what was delivered, by a count.
                prompt = call.ticket.prompt_estimate if call.ticket else 0
                usage = Usage.counted(prompt, delivered // 2 // CHARS_PER_TOKEN)
            status = 200 if completed else 499
            # Shielded: a client disconnect cancels this generator, settlement must still land.
            await asyncio.shield(self._settle(call, True, usage, status, None if completed else "client_closed"))

    async def _settle_before_answer(self, call: Call, usage: Usage) -> asyncio.Task | None:
        """Send the settlement, then answer without waiting for its reply (two wake-ups of this
        process, ~0.2-0.4 ms at one connection). Once the settle call is written to Redis, Redis
        applies it before anything the client can send after reading the answer: the concurrency
        slot is free, the charge counted, and a key over its velocity limit is refused by admission
        (settle.lua marks it) before its suspension reaches SQL. A settlement that cannot even be
        sent fails the request as before (503); one that fails after being sent is logged (the
        lease then expires and is reaped as failed: nothing is charged twice)."""
        loop = asyncio.get_running_loop()
        sent = loop.create_future()
        task = loop.create_task(self._settle(call, True, usage, 200, None, sent))
        await asyncio.wait((sent, task), return_when=asyncio.FIRST_COMPLETED)
        if task.done() or sent.exception() is not None:
            await task  # settled already, or failed before reaching Redis: as if awaited in line
            return None
        task.add_done_callback(_report_late_failure)
        return task

    def _error(self, call: Call, exc: TrexError) -> Answer:
        headers = call.headers()
        headers.update(exc.response_headers())
        self._emit(call, exc.status, exc.code or exc.type, None, 0)
        return Answer(exc.status, headers, exc.body(call.request_id, call.attempts))

    # ---- settlement and records ---------------------------------------------------------------

    async def _settle_failure(self, call: Call) -> None:
        if call.ticket is not None and call.ticket.lease_id is not None:
            ticket, call.ticket.lease_id = call.ticket, None
            with tracing.step(call, "trex.settlement"):
                await self.gate.settle(ticket, Settlement(False))

    async def _settle(self, call: Call, ok: bool, usage: Usage, status: int, error: str | None,
                      sent: asyncio.Future | None = None) -> None:
        charged = 0
        if call.ticket is not None:
            target = call.served
            try:
                with tracing.step(call, "trex.settlement"):
                    charged = await self.gate.settle(call.ticket, Settlement(
                        ok, usage, target.provider if target else None, target.upstream_model if target else None,
                        target.model.id if target else None), sent)
            except Exception:
                if not _written(sent):
                    raise  # the answer has not left: the request fails (503) as it always did
                # The answer has left: its record is still written; the lease is reaped as failed.
                log.exception("settlement of %s failed after its answer was sent", call.request_id)
            call.ticket.lease_id = None
        self._emit(call, status, error, usage, charged)

    def _emit(self, call: Call, status: int, error: str | None, usage: Usage | None, charged: int) -> None:
        p = call.principal
        rec = RequestRecord(
            request_id=call.request_id, api=call.api, account_id=p.account_id if p else None,
            key_id=p.key_id if p else None, key_prefix=p.key_prefix if p else None,
            model_requested=call.model_requested,
            provider=call.served.provider if call.served else None,
            model_served=call.served.upstream_model if call.served else None,
            attempts=len(call.attempts), fallbacks=max(0, len(call.attempts) - 1), status=status,
            error_code=error, latency_ms=round(((call.answered or time.monotonic()) - call.started) * 1000, 3),
            ttfb_ms=round(call.ttfb_ms, 3) if call.ttfb_ms is not None else None,
            tokens_in=usage.prompt_tokens if usage else 0, tokens_out=usage.completion_tokens if usage else 0,
            billing=call.ticket.billing if call.ticket else None, credits_charged=charged,
            stream=call.stream, client_ip=call.client_ip, attempt_detail=list(call.attempts), cache=call.cache)
        if usage is not None:
            rec.tokens_cache_read, rec.tokens_cache_write = usage.cache_read_tokens, usage.cache_write_tokens
            rec.tokens_cache_write_1h, rec.tokens_reasoning = usage.cache_write_1h_tokens, usage.reasoning_tokens
        tracing.finish(call, rec)
        self.record(rec)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _written(sent: asyncio.Future | None) -> bool:
    return sent is not None and sent.done() and not sent.cancelled() and sent.exception() is None


def _report_late_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("settlement after the answer failed", exc_info=task.exception())
