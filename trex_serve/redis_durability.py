"""Durable counter writes: each batch of admission and settlement calls is followed, on the same
connection, by ``WAIT replicas timeout``, and no caller hears its answer before that many replicas
have acknowledged the batch. Redis replicates asynchronously: without this, a charge the primary
applied and answered can vanish when a replica that never received it is promoted (a failover).

Why per batch and on the same connection: ``WAIT`` counts the replication offset of the writes of
its own connection only, and while it blocks, Redis holds back every later reply on that socket.
One ``WAIT`` after the whole group-commit batch covers every call in it and costs one replica
round trip per batch, not per request.

What a caller sees when the replicas do not acknowledge in time (``NotReplicated``):
- an admission fails closed (503 ``counter_store_unavailable``): no upstream is called. What the
  primary counted is given back at once (a settlement as failed, sent once: counters.py
  ``_admit_call``); an RPM slot stays counted, and a lease the give-back cannot reach is reaped
  when it expires.
- a settlement is sent again (durable_calls.py ``_replicated``), with a short backoff, until it is
  acknowledged or its deadline passes. That is safe because the admission it settles was itself
  acknowledged (it is on every replica that acknowledged it) and settle.lua consumes that record
  atomically: on a promoted replica that never saw the first settlement it charges now; where the
  first one survived, the retry finds nothing to settle and the first answer stands. A whole
  answer leaves only once its settlement is acknowledged (``sent`` resolves then). Past the
  deadline, a settlement the last attempt found on a primary (applied, not acknowledged: a new
  primary with no replica attached yet) stands and the request is answered: a 503 there would
  charge a client for an answer it never got. If the last attempt reached no primary, the
  request answers 503 and its charge stands only if some earlier write of it survives.
- the failed-auth throttle does not wait: a count lost in a failover costs nothing.

Off by default (``TREX_REDIS_WAIT_REPLICAS=0``): docs/RELIABILITY.md has the measured cost and the
choice of ``replicas`` (one of two replicas keeps serving through a failover; all replicas is
strict but a replica's outage then stops admissions)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

Handler = Callable[[Any, BaseException | None], None]


class NotReplicated(RedisError):
    """The primary ran the call, but fewer replicas than required acknowledged it in time.
    ``reply`` is what the primary answered (the call may or may not survive a failover)."""

    def __init__(self, reply: Any, acks: int, wanted: int) -> None:
        super().__init__(f"acknowledged by {acks} of the {wanted} Redis replica(s) required")
        self.reply = reply
        self.acks = acks


@dataclass(frozen=True)
class Durability:
    replicas: int
    timeout_ms: int = 100
    settle_deadline_s: float = 10.0

    @classmethod
    def from_settings(cls, replicas: int, timeout_ms: int, settle_deadline_s: float) -> Durability | None:
        if replicas <= 0:
            return None
        if timeout_ms <= 0:  # WAIT 0 would block forever
            raise ValueError("TREX_REDIS_WAIT_TIMEOUT_MS must be positive")
        return cls(replicas, timeout_ms, settle_deadline_s)

    def command(self) -> tuple[Any, ...]:
        return ("WAIT", self.replicas, self.timeout_ms)

    def _acks(self, wait_reply: Any) -> int:
        return wait_reply if isinstance(wait_reply, int) else -1  # an error reply: nothing known

    def results(self, replies: Sequence[Any]) -> list[Any]:
        """``replies`` of a batch followed by its WAIT's reply -> the batch's results, each
        successful one replaced by ``NotReplicated`` when the WAIT fell short."""
        *batch, wait_reply = replies
        acks = self._acks(wait_reply)
        if acks >= self.replicas:
            return batch
        return [r if isinstance(r, BaseException) else NotReplicated(r, max(acks, 0), self.replicas)
                for r in batch]

    def guard(self, commands: Sequence[Sequence[Any]], handlers: Sequence[Handler]
              ) -> tuple[list[Sequence[Any]], list[Handler]]:
        """For a write whose replies go to ``handlers`` as they are read: the same commands and a
        WAIT, and handlers that hold each reply until the WAIT's reply says it is acknowledged
        (or the connection is lost, which each handler then hears as its own)."""
        held: list[Any] = [None] * len(handlers)

        def hold(i: int, reply: Any, lost: BaseException | None) -> None:
            held[i] = lost if lost is not None else reply

        def release(wait_reply: Any, lost: BaseException | None) -> None:
            if lost is not None:
                for handler in handlers:
                    handler(None, lost)
                return
            for handler, result in zip(handlers, self.results([*held, wait_reply]), strict=True):
                handler(result, None)

        wrapped: list[Handler] = [functools.partial(hold, i) for i in range(len(handlers))]
        return [*commands, self.command()], [*wrapped, release]
