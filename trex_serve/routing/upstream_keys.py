"""Several managed keys per provider: which key an account's request uses, and the keys' shared
state (cooling after a 429, out after a 401/403, outbound RPM/TPM budgets) kept in Redis so every
ingress replica sees the same, exactly (``lua/upkey_pick.lua``, ``lua/upkey_mark.lua``).

Only key *ids* live here (the variable's name or the catalog's ``id``): the secrets stay in the
environment of the provider pool that sends them."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trex_serve.catalog import Provider, UpstreamKey

_LUA_DIR = Path(__file__).resolve().parent / "lua"
_TWO_64 = float(2 ** 64)


def _unit(account: str, key_id: str) -> float:
    """A uniform number in (0, 1) fixed by the (account, key) pair."""
    digest = hashlib.blake2b(f"{account}\x00{key_id}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / _TWO_64


def rendezvous_order(account: str, keys: Sequence[UpstreamKey]) -> list[UpstreamKey]:
    """The account's keys in preference order, by weighted rendezvous hashing: each key scores
    ``-weight / ln(u)`` with ``u`` drawn from the pair's hash; the highest wins. An account keeps
    its key while it is usable (its cache at the provider stays warm); a key added or removed only
    moves the accounts whose best key changes, in proportion to its weight."""
    return sorted(keys, key=lambda k: -k.weight / math.log(_unit(account, k.key_id)), reverse=True)


@dataclass(frozen=True)
class Pick:
    key: UpstreamKey | None  # None: every key is out, cooling or over budget
    wait_s: float | None  # until the soonest skipped key may be usable again
    skipped: tuple[tuple[str, str], ...]  # (key id, why) of the keys passed over


@dataclass(frozen=True)
class KeyState:
    state: str  # active | cooling | out
    rpm_used: int
    seconds_left: float


class KeyStore:
    """The keys' shared state in Redis. One Lua call per pick (exact under any concurrency), one
    per mark; the same single-Redis deployment as the counter store."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._pick = client.register_script((_LUA_DIR / "upkey_pick.lua").read_text())
        self._mark = client.register_script((_LUA_DIR / "upkey_mark.lua").read_text())

    async def pick(self, provider: str, ordered: Sequence[UpstreamKey], member: str, tokens: int,
                   now: float | None = None) -> Pick:
        args: list[Any] = [self.prefix, provider, "" if now is None else repr(now), member, max(0, int(tokens)),
                           len(ordered)]
        for key in ordered:
            args += [key.key_id, key.rpm or 0, key.tpm or 0]
        index, wait_ms, skipped = await self._pick(args=args)
        reasons = tuple(tuple(_s(s).split("=", 1)) for s in skipped)
        wait = None if int(wait_ms) < 0 else int(wait_ms) / 1000
        chosen = ordered[int(index) - 1] if int(index) else None
        return Pick(chosen, wait, reasons)  # type: ignore[arg-type]

    async def cool(self, provider: str, key_id: str, seconds: float) -> bool:
        """The key answered 429. True when this call started its cool-down."""
        ms = max(1, int(seconds * 1000))
        return bool(await self._mark(args=[self.prefix, provider, key_id, "cool", ms, ""]))

    async def take_out(self, provider: str, key_id: str, seconds: float) -> bool:
        """The key answered 401/403. True for the one caller (of any replica) that took it out."""
        ms = max(1, int(seconds * 1000))
        return bool(await self._mark(args=[self.prefix, provider, key_id, "out", ms, ""]))

    async def reinstate(self, provider: str, key_id: str) -> bool:
        """An operator puts the key back at once (a rotated secret, a lifted limit). True when it
        was cooling or out."""
        base = f"{self.prefix}uk:{provider}:{key_id}:"
        return bool(await self.client.delete(base + "cool", base + "out"))

    async def used_tokens(self, provider: str, key_id: str, member: str, tokens: int) -> None:
        await self._mark(args=[self.prefix, provider, key_id, "tokens", max(0, int(tokens)), member])

    async def states(self, providers: Sequence[Provider]) -> dict[tuple[str, str], KeyState]:
        """Every configured key's state, for /metrics and the operator (one pipelined round trip)."""
        pairs = [(p.name, k.key_id) for p in providers for k in p.keys]
        if not pairs:
            return {}
        horizon = "(" + repr(await self._server_now() - 60)
        pipe = self.client.pipeline(transaction=False)
        for provider, key_id in pairs:
            base = f"{self.prefix}uk:{provider}:{key_id}:"
            pipe.pttl(base + "out")
            pipe.pttl(base + "cool")
            pipe.zcount(base + "rpm", horizon, "+inf")
        raw = await pipe.execute()
        out: dict[tuple[str, str], KeyState] = {}
        for i, pair in enumerate(pairs):
            out_ms, cool_ms, used = raw[3 * i: 3 * i + 3]
            if out_ms > 0 or out_ms == -1:
                out[pair] = KeyState("out", int(used), max(0, out_ms) / 1000)
            elif cool_ms > 0:
                out[pair] = KeyState("cooling", int(used), cool_ms / 1000)
            else:
                out[pair] = KeyState("active", int(used), 0.0)
        return out

    async def _server_now(self) -> float:
        sec, usec = await self.client.time()
        return sec + usec / 1_000_000


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
