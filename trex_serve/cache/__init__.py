"""The response cache: an opt-in, exact-match cache of whole answers in Redis, per account.

``keys.py`` says what a request's entry is named by and how long it lives, ``redis_cache.py`` keeps
the entries (bounded in size and memory, never failing a request), ``replay.py`` turns an entry
back into an answer. The pipeline's steps that use them are in ``trex_serve/pipeline/stateful.py``."""

from __future__ import annotations

# The longest time-to-live a request or a key may ask for: an entry is a copy of an answer, kept no
# longer than a stored response is by default.
MAX_TTL_S = 30 * 86400
