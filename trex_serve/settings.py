"""Settings read from the stable ``TREX_*`` environment surface (CONTRACT.md section 8)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from trex_serve.redis_durability import Durability

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
DEFAULT_CATALOG = REPO_DIR / "config" / "catalog.yaml"


def state_dir() -> Path:
    """Where the local start keeps its SQLite file, Redis socket, pids and logs."""
    path = Path(os.environ.get("TREX_HOME", Path.cwd() / ".trex"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


@dataclass(frozen=True)
class Settings:
    catalog_path: str = str(DEFAULT_CATALOG)
    database_url: str = ""
    redis_url: str = ""
    admin_token: str = ""
    secret_key: str = ""
    http_port: int = 8000
    max_body_bytes: int = 4 * 1024 * 1024
    max_attempts: int = 4
    request_deadline_s: float = 120.0
    auth_failures_per_minute: int = 20
    trusted_proxies: tuple[str, ...] = field(default_factory=tuple)
    pool_secret: str = ""
    log_retention_days: int = 30
    # A stream entry read by a replica and not acknowledged for this long is taken over by another
    # (the reader died); a live reader re-reads its own pending entries well within it.
    stream_claim_idle_ms: int = 15_000
    # Durable counter writes (redis_durability.py): replicas that must acknowledge each batch of
    # admissions and settlements before callers hear of it; 0 = off (Redis's asynchronous replication).
    redis_wait_replicas: int = 0
    redis_wait_timeout_ms: int = 100
    redis_settle_deadline_s: float = 10.0
    # Stored responses (the Responses API's `store`) are kept this many days, then deleted.
    response_retention_days: int = 30
    # The response cache's Redis (empty: TREX_REDIS_URL's), the memory its entries may take in all,
    # and the largest entry it keeps (a larger answer is served, not cached).
    cache_redis_url: str = ""
    cache_max_bytes: int = 256 * 1024 * 1024
    cache_max_entry_bytes: int = 1024 * 1024

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        proxies = tuple(p.strip() for p in env.get("TREX_TRUSTED_PROXIES", "").split(",") if p.strip())
        return cls(
            catalog_path=env.get("TREX_CATALOG") or str(DEFAULT_CATALOG),
            database_url=env.get("TREX_DATABASE_URL", ""),
            redis_url=env.get("TREX_REDIS_URL", ""),
            admin_token=env.get("TREX_ADMIN_TOKEN", ""),
            secret_key=env.get("TREX_SECRET_KEY", ""),
            http_port=_int("TREX_HTTP_PORT", 8000),
            max_body_bytes=_int("TREX_MAX_BODY_BYTES", 4 * 1024 * 1024),
            max_attempts=_int("TREX_MAX_ATTEMPTS", 4),
            request_deadline_s=float(env.get("TREX_REQUEST_DEADLINE_S", "120")),
            auth_failures_per_minute=_int("TREX_AUTH_FAILURES_PER_MINUTE", 20),
            trusted_proxies=proxies,
            pool_secret=env.get("TREX_POOL_SECRET", ""),
            log_retention_days=_int("TREX_LOG_RETENTION_DAYS", 30),
            stream_claim_idle_ms=_int("TREX_STREAM_CLAIM_IDLE_MS", 15_000),
            redis_wait_replicas=_int("TREX_REDIS_WAIT_REPLICAS", 0),
            redis_wait_timeout_ms=_int("TREX_REDIS_WAIT_TIMEOUT_MS", 100),
            redis_settle_deadline_s=float(env.get("TREX_REDIS_SETTLE_DEADLINE_S") or 10.0),
            response_retention_days=max(1, _int("TREX_RESPONSE_RETENTION_DAYS", 30)),
            cache_redis_url=env.get("TREX_CACHE_REDIS_URL", ""),
            cache_max_bytes=_int("TREX_CACHE_MAX_BYTES", 256 * 1024 * 1024),
            cache_max_entry_bytes=_int("TREX_CACHE_MAX_ENTRY_BYTES", 1024 * 1024),
        )

    def durability(self) -> Durability | None:
        return Durability.from_settings(self.redis_wait_replicas, self.redis_wait_timeout_ms,
                                        self.redis_settle_deadline_s)
