"""A bounded, batched, asynchronous writer that keeps writes off the hot path. Rows wait in the
buffer while the target is slow or down and are retried; what overflows is counted, never silently
lost. The gateway uses it to hand request-log rows and risk events to a Redis stream (durable_streams.py),
which is where they become durable; the ledger never passes through it."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("trex.writer")


class BatchWriter:
    def __init__(self, name: str, flush: Callable[[list[dict[str, Any]]], None | Awaitable[None]], *,
                 max_buffer: int = 100_000, batch_size: int = 500, interval_s: float = 0.2,
                 wake_at: int | None = None) -> None:
        """``flush`` is a blocking function (run in a thread) or a coroutine function (awaited).
        ``wake_at``: buffered rows that wake the writer at once (default ``batch_size``); 1 sends each
        event-loop turn's rows together as soon as the turn ends."""
        self.name = name
        self._flush = flush
        self._async = inspect.iscoroutinefunction(flush)
        self.max_buffer = max_buffer
        self.batch_size = batch_size
        self.interval_s = interval_s
        self.wake_at = wake_at or batch_size
        self._buf: deque[dict[str, Any]] = deque()
        self.dropped = 0
        self.written = 0
        self.failures = 0
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        # One flush at a time: a caller's flush_once waits for a batch the background task has
        # already taken, so "flushed" means written.
        self._flushing = asyncio.Lock()

    def put(self, row: dict[str, Any]) -> bool:
        if len(self._buf) >= self.max_buffer:
            self.dropped += 1
            return False
        self._buf.append(row)
        if len(self._buf) >= self.wake_at:
            self._wake.set()
        return True

    @property
    def pending(self) -> int:
        return len(self._buf)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"writer-{self.name}")

    async def _run(self) -> None:
        backoff = self.interval_s
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=backoff)
            except TimeoutError:
                pass
            self._wake.clear()
            ok = await self.flush_once()
            backoff = self.interval_s if ok else min(5.0, backoff * 2)
            if not ok:  # a failing target is retried on the backoff, not on every put()
                await asyncio.sleep(backoff)

    async def flush_once(self) -> bool:
        """Write what is buffered; on failure the rows go back to the front and wait."""
        async with self._flushing:
            return await self._flush_buffered()

    async def _flush_buffered(self) -> bool:
        while self._buf:
            batch = [self._buf.popleft() for _ in range(min(self.batch_size, len(self._buf)))]
            try:
                if self._async:
                    await self._flush(batch)  # type: ignore[misc]
                else:
                    await asyncio.to_thread(self._flush, batch)
            except Exception:
                self.failures += 1
                self._buf.extendleft(reversed(batch))
                log.warning("%s writer: database write failed; %d rows wait", self.name, len(self._buf),
                            exc_info=self.failures == 1)
                return False
            self.written += len(batch)
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        await self.flush_once()
