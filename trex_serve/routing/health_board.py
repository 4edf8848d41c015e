"""The Router's logic without Ray: outcome reports in, versioned routing tables out.

Ingress replicas fetch the table in a loop, passing the count of circuit changes they have seen.
When nothing changed the answer waits (up to ``wait_s``) for a change, so a circuit that opens or
closes reaches every ingress replica as soon as a pool reports it, not at the next poll, while an
idle Router still answers each replica about once per ``wait_s``."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Iterable

from trex_serve.routing.health import HealthPolicy, HealthTracker, Outcome
from trex_serve.routing.resolve import RoutingTable


class HealthBoard:
    def __init__(self, policy: HealthPolicy | None = None, clock: Callable[[], float] = time.time) -> None:
        self.tracker = HealthTracker(policy)
        self.clock = clock
        self.epoch = uuid.uuid4().hex[:12]
        self.version = 0
        self.changes = 0
        self._changed = asyncio.Event()

    def report(self, outcomes: Iterable[Outcome]) -> None:
        changed = False
        for outcome in outcomes:
            changed = self.tracker.record(outcome) or changed
        self.version += 1
        if changed:
            self.changes += 1
            # Wake every waiting fetch; later ones wait on a fresh event.
            event, self._changed = self._changed, asyncio.Event()
            event.set()

    async def table(self, seen: int | None = None, wait_s: float = 0.0) -> RoutingTable:
        if seen == self.changes and wait_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait_s)
        # Circuits move from open to half-open with time alone, so every answer re-reads the state.
        self.version += 1
        return RoutingTable(self.tracker.snapshot(self.clock()), self.version, self.epoch, self.changes)
