"""API keys, owner tokens and ids: generation and hashing.

Keys are shown once and stored only as a SHA-256 hex digest; the first 12 characters (the
``prefix``) are kept in clear so logs and dashboards can tell keys apart.
"""

from __future__ import annotations

import hashlib
import secrets
import string

KEY_PREFIX = "trex-"
OWNER_TOKEN_PREFIX = "trexo-"
PREFIX_LEN = 12
_ALPHABET = string.ascii_letters + string.digits


def _random(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def new_id(kind: str) -> str:
    """``acc_<hex>``, ``key_<hex>``, ``bnd_<hex>``..."""
    return f"{kind}_{secrets.token_hex(8)}"


def generate_api_key() -> str:
    """A fresh API key: ``trex-`` followed by 40 base62 characters (~238 bits)."""
    return KEY_PREFIX + _random(40)


def generate_owner_token() -> str:
    return OWNER_TOKEN_PREFIX + _random(40)


def hash_key(plaintext: str) -> str:
    """SHA-256 hex digest of a key or token (the only form stored)."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def key_prefix(plaintext: str) -> str:
    return plaintext[:PREFIX_LEN]
