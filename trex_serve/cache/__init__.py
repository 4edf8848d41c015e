"""The response cache: an opt-in, exact-match cache of whole answers in Redis, per account.

``keys.py`` says what a request's entry is named by and how long it lives, ``redis_cache.py`` keeps
the entries (bounded in size and memory, never failing a request), ``replay.py`` turns an entry
back into an answer. The pipeline's steps that use them are in ``trex_serve/pipeline/stateful.py``."""

from __future__ import annotations

# Defined with the key's stored shape (store/shapes.py), which checks a key's default against it.
from trex_serve.store.shapes import MAX_CACHE_TTL_S as MAX_TTL_S

__all__ = ["MAX_TTL_S"]
