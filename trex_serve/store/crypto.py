"""Provider-key encryption at rest (Fernet / MultiFernet from ``TREX_SECRET_KEY``).

Any string works as a secret: a 32-byte Fernet key is derived from it with SHA-256. A
comma-separated list enables rotation: the first secret encrypts, all of them decrypt, and
``Repository.rotate_bindings`` re-encrypts every stored binding with the first one. This module
knows nothing of the repository: the repository uses it, never the other way round.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class DecryptionError(ValueError):
    """A stored secret cannot be decrypted with any configured key."""


def derive_key(secret: str) -> bytes:
    return base64.urlsafe_b64encode(hashlib.sha256(secret.encode("utf-8")).digest())


def split_secrets(secret: str) -> list[str]:
    return [part.strip() for part in (secret or "").split(",") if part.strip()]


class SecretBox:
    def __init__(self, secret: str) -> None:
        parts = split_secrets(secret)
        if not parts:
            raise ValueError("a secret key is required to encrypt provider keys (TREX_SECRET_KEY)")
        self._fernet = MultiFernet([Fernet(derive_key(p)) for p in parts])

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode("ascii")).decode("utf-8")
        except (InvalidToken, ValueError) as exc:
            raise DecryptionError("stored secret cannot be decrypted with TREX_SECRET_KEY") from exc

    def rotate_token(self, token: str) -> str:
        """Re-encrypt ``token`` with the first (primary) key."""
        try:
            return self._fernet.rotate(token.encode("ascii")).decode("ascii")
        except InvalidToken as exc:
            raise DecryptionError("stored secret cannot be decrypted with TREX_SECRET_KEY") from exc


def mask(secret: str | None) -> str | None:
    """``sk-proj-abc...wxyz`` -> ``sk-…wxyz``: a short leading scheme and at most the last 4 chars."""
    if secret is None:
        return None
    head = ""
    dash = secret.find("-")
    if 0 < dash <= 4:
        head = secret[: dash + 1]
    tail = secret[-4:] if len(secret) >= 12 else ""
    return f"{head}…{tail}"
