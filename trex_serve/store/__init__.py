"""Durable control-plane storage: SQLModel tables, migrations, the repository, encryption."""

from trex_serve.store.crypto import SecretBox, mask
from trex_serve.store.database import create_engine, migrate, normalize_url
from trex_serve.store.repository import KeyContext, Repository, as_utc, credits, to_micro

__all__ = [
    "KeyContext",
    "Repository",
    "SecretBox",
    "as_utc",
    "create_engine",
    "credits",
    "mask",
    "migrate",
    "normalize_url",
    "to_micro",
]
