"""The counter store's calls when Redis writes must be acknowledged by replicas (``WAIT``,
trex_serve/redis_durability.py): the hot path's retry rules per script, and the rare writes outside
it. A mixin of :class:`~trex_serve.admission.counter_scripts.ScriptCaller`, which holds the plain
calls these wrap."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from trex_serve.redis_durability import Durability, NotReplicated

log = logging.getLogger("trex.counters")


class DurableCalls:
    client: aioredis.Redis
    timeout_s: float

    async def _once(self, script: Any, args: list[Any], batch: bool, sent: asyncio.Future | None) -> Any:
        raise NotImplementedError  # ScriptCaller's: one call, batched or not

    async def _replicated(self, script: Any, args: list[Any], batch: bool, durable: Durability) -> Any:
        """One call acknowledged by ``durable.replicas`` replicas (redis_durability.py says why each
        script is treated as it is). A settlement is sent again until acknowledged (a lost
        connection or a failover in between included), within its deadline; if a retry finds
        nothing left to settle, the first attempt's effect survived and its answer stands.
        Past the deadline, a settlement the primary last reached holds (it answered, no replica
        acknowledged) stands as settled: refusing that request would charge a client for an answer
        it never got. Only when the last attempt reached no primary is the outcome unknown, and the
        call fails."""
        retry = script.name == "settle"
        first: Any = None
        held = False  # the primary the last attempt reached holds the settlement, unacknowledged
        delay = 0.02
        try:
            async with asyncio.timeout(durable.settle_deadline_s if retry else self.timeout_s):
                while True:
                    try:
                        result = await self._once(script, args, batch, None)
                        if isinstance(result, NotReplicated):  # the direct path returns replies in place
                            raise result
                    except NotReplicated as exc:
                        if script.name == "auth":  # a throttle count lost in a failover costs nothing
                            return exc.reply
                        if not retry:
                            raise
                        first = exc.reply if first is None else first
                        held = True
                    except (RedisConnectionError, RedisTimeoutError, OSError):
                        if not retry:
                            raise
                        held = False
                    else:
                        if first is not None and not isinstance(result, BaseException) and int(result[0]) == 0:
                            return first
                        return result
                    await asyncio.sleep(delay)
                    delay = min(0.25, delay * 2)
        except TimeoutError:
            if not held:
                raise
            log.warning("a settlement stands unacknowledged by Redis replicas after %.1f s: answered as settled",
                        durable.settle_deadline_s)
            return first

    async def _evalsha_acknowledged(self, script: Any, args: list[Any], keys: Sequence[str],
                                    durable: Durability) -> Any:
        """A rare write outside the hot path (a credits grant, a balance set by reconcile) with its
        WAIT on the same pooled connection: a grant lost in a failover would leave the balance below
        the ledger."""
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            pipe.execute_command(*durable.command())
            replies = await pipe.execute(raise_on_error=False)
            if isinstance(replies[0], NoScriptError) and attempt == 1:
                await self.client.script_load(script.body)
                continue
            result = durable.results(replies)[0]
            if isinstance(result, BaseException):
                raise result
            return result
        raise AssertionError("unreachable")
