"""The request id the front proxy assigns, and the proof that it came from the front proxy.

`trex-serve up` runs a small HAProxy of our own in front of Serve's (local/front_proxy.py). It names
every request (``X-Trex-Front-Id``) and signs the hop with a secret derived from TREX_SECRET_KEY
(``X-Trex-Front-Auth``). When the ingress replica serving a request dies before a byte of the
answer left it, Serve's HAProxy replays the request on another replica with the same headers, and
the ingress uses that id as the request id: admission and settlement are idempotent by it
(lua/admit.lua, lua/settle.lua), so a replay is never charged twice. A client cannot choose the
id: the front proxy drops both headers from what the client sent, and the ingress believes the id
only with the right secret."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from functools import lru_cache

ID_HEADER = "X-Trex-Front-Id"
AUTH_HEADER = "X-Trex-Front-Auth"
_ID = re.compile(r"req_[0-9a-f]{32}")


@lru_cache(maxsize=4)
def front_secret(secret_key: str) -> str:
    """Derived from the first (current) secret key, so the front proxy and every ingress replica
    agree without another setting; empty when there is no secret key (ids are then never believed)."""
    first = secret_key.split(",")[0].strip()
    if not first:
        return ""
    return hmac.new(first.encode(), b"trex-front-hop", hashlib.sha256).hexdigest()


def trusted_request_id(headers: Mapping[str, str], secret: str) -> str | None:
    """The front proxy's request id, or None when absent, malformed or not signed by the front."""
    if not secret:
        return None
    auth = headers.get(AUTH_HEADER.lower()) or ""
    if not hmac.compare_digest(auth.encode(), secret.encode()):
        return None
    rid = (headers.get(ID_HEADER.lower()) or "").lower()
    return rid if _ID.fullmatch(rid) else None
