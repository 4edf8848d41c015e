"""What a pool replica answers the ingress when the upstream did not give a usable answer: the
failure envelope with its ``H_FAILURE`` reason, the upstream's Retry-After, and the redaction that
keeps a provider key out of every error text that leaves the pool."""

from __future__ import annotations

import orjson

from trex_serve.hop import contract as hop
from trex_serve.hop.lean_messages import Response


def redact(text: str, secret: str | None) -> str:
    """Upstreams sometimes quote the credential they were sent in an error message ("Incorrect API
    key provided: sk-..."): the key never travels further than the pool."""
    if not text or not secret or len(secret) < 6:
        return text
    if secret in text:
        text = text.replace(secret, "[redacted]")
    # Partial quotes (a long prefix or suffix) are as good as the key for guessing: cut them too.
    for part in {secret[:len(secret) // 2], secret[-(len(secret) // 2):]}:
        if len(part) >= 8 and part in text:
            text = text.replace(part, "[redacted]")
    return text


def redacted(text: str | None, secret: str | None) -> str | None:
    return None if text is None else redact(text, secret)


def failure_response(status: int, failure: str, message: str, retry_after: float | None = None) -> Response:
    headers = {hop.H_FAILURE: failure}
    if retry_after is not None:
        headers["Retry-After"] = str(int(retry_after))
    body = orjson.dumps({"error": {"message": message, "type": "upstream_error", "code": failure}})
    return Response(status=status, body=body, headers=headers, content_type="application/json")


def upstream_retry_after(headers) -> float | None:
    raw = headers.get("Retry-After")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None
