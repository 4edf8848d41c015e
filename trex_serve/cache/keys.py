"""What names a cache entry and how long it lives.

An entry is an exact match on: the account (any key of it shares the entry; no other account can
reach it), the API (chat or Responses), the model route (the public model, whether smart-auto or a
pinned provider, and the candidates the catalog lists for it today), the routing extension
(``trex.routing``: pins and fallbacks change who answers), and every other field of the body, in
canonical form (keys sorted), ``stream`` and ``stream_options`` included: a whole answer and a
stream are different entries. Only ``trex.cache`` itself is left out; it says how long to keep the
answer, not what the answer is."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from trex_serve.routing.resolve import Resolution

# Bumped when the meaning of an entry changes, so old entries are never read as new ones.
ENTRY_FORMAT = 1


def ttl_for(payload: dict[str, Any], key_default: int | None) -> int:
    """Seconds to keep this request's answer: the body's ``trex.cache.ttl_s`` (0 turns the cache off
    for this request), else the key's default; 0 means the cache is not used."""
    trex = payload.get("trex")
    cache = trex.get("cache") if isinstance(trex, dict) else None
    if isinstance(cache, dict) and isinstance(cache.get("ttl_s"), int):
        return max(0, cache["ttl_s"])  # validated by the request schema (api/schemas.py)
    return max(0, key_default or 0)


def entry_digest(api: str, resolution: Resolution, payload: dict[str, Any]) -> str:
    """The entry's name within its account: a SHA-256 over everything that changes the answer."""
    body = {k: v for k, v in payload.items() if k != "trex"}
    trex = payload.get("trex")
    routing = trex.get("routing") if isinstance(trex, dict) else None
    route = [resolution.public_model, resolution.smart_auto, resolution.pinned,
             [[t.provider, t.upstream_model] for t in resolution.targets]]
    material = orjson.dumps([ENTRY_FORMAT, api, route, routing, body], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(material).hexdigest()
