"""The app builder: typed arguments → a Serve application with one Ingress, one Router and one
ProviderPool deployment per catalog provider, each pool with its own autoscaling settings.
Used by `serve deploy config/serve.yaml` (import path deployments.app:build_app) and `trex-serve up`."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from deployments.ingress import Ingress
from deployments.provider_pool import ProviderPool
from deployments.router import Router
from deployments.spreader import Spreader
from trex_serve.catalog import load_catalog
from trex_serve.settings import Settings


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    catalog_path: str | None = None
    database_url: str | None = None
    redis_url: str | None = None
    admin_token: str | None = None
    secret_key: str | None = None
    pool_secret: str | None = None
    ingress_replicas: int = Field(default=1, ge=1)
    pool_autoscaling: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Nodes to spread replicas over; None counts the cluster's alive nodes when the app is built.
    spread_nodes: int | None = Field(default=None, ge=1)
    # Set by the spread supervisor (spreader.py) when it deploys the app again after the number of
    # alive nodes changed; `spread_supervisor: false` (or a fixed spread_nodes) turns it off.
    live_nodes: int | None = Field(default=None, ge=1)
    spread_supervisor: bool = True
    # Any new value deploys the app again (`trex-serve up` / `redeploy` set one each time).
    revision: str | None = None


def _alive_nodes() -> int:
    import ray

    if not ray.is_initialized():
        return 1
    return max(1, sum(1 for n in ray.nodes() if n.get("Alive")))


def per_node_cap(replicas: int, nodes: int) -> int | None:
    """At most this many replicas of one deployment per node, so that with two or more nodes no
    single node holds all of them: Serve's default SPREAD is a best-effort round robin shared by every
    actor, and it can put both ingress replicas on one node. None on one node (no cap: a one-node
    gateway keeps every replica it asks for)."""
    if nodes <= 1 or replicas <= 1:
        return None
    return math.ceil(replicas / nodes)


def _derived_pool_secret(secret_key: str) -> str:
    if not secret_key:
        return secrets.token_urlsafe(32)
    return hmac.new(secret_key.encode(), b"trex-pool-hop", hashlib.sha256).hexdigest()


def build_app(raw_args: dict[str, Any] | None = None) -> Application:
    raw = dict(raw_args or {})
    if "ingress_replicas" not in raw and os.environ.get("TREX_INGRESS_REPLICAS"):
        raw["ingress_replicas"] = int(os.environ["TREX_INGRESS_REPLICAS"])
    if "pool_autoscaling" not in raw and os.environ.get("TREX_POOL_AUTOSCALING"):
        # JSON: {"provider": {autoscaling_config overrides}}, for `trex-serve up` without a serve.yaml.
        raw["pool_autoscaling"] = json.loads(os.environ["TREX_POOL_AUTOSCALING"])
    args = AppArgs.model_validate(raw)
    env = Settings.from_env()
    catalog_path = args.catalog_path or env.catalog_path
    catalog = load_catalog(catalog_path)
    resolved = {
        "catalog_path": catalog_path,
        # The catalog's content is part of the deployment's arguments, so deploying a changed
        # catalog rolls the replicas over even when its path is the same.
        "catalog_sha": hashlib.sha256(Path(catalog_path).read_bytes()).hexdigest()[:16],
        "database_url": args.database_url or env.database_url,
        "redis_url": args.redis_url or env.redis_url,
        "admin_token": args.admin_token or env.admin_token,
        "secret_key": args.secret_key or env.secret_key,
        # Only our ingress replicas may call the pools' ports. Derived from the stable secret key so a
        # redeploy (old ingress replicas meeting new pool replicas mid-rollout) keeps one secret.
        "pool_secret": args.pool_secret or env.pool_secret or _derived_pool_secret(args.secret_key or env.secret_key),
    }
    nodes = args.spread_nodes or args.live_nodes or _alive_nodes()
    router = Router.bind(catalog.health.model_dump())
    supervise = args.spread_supervisor and args.spread_nodes is None
    spreader = Spreader.bind(nodes) if supervise else None
    pools = {}
    for provider in catalog.providers:
        sizing = provider.pool
        autoscaling = {
            "min_replicas": sizing.min_replicas,
            "max_replicas": sizing.max_replicas,
            "target_ongoing_requests": sizing.target_ongoing_requests,
            "upscale_delay_s": 5,
            "downscale_delay_s": 30,
            "policy": {"policy_function": "deployments.provider_pool:inflight_policy"},
            **args.pool_autoscaling.get(provider.name, {}),
        }
        # Capped by the pool's ceiling, so that autoscaling can still reach it on these nodes.
        cap = per_node_cap(int(autoscaling["max_replicas"]), nodes)
        pools[provider.name] = ProviderPool.options(
            name=f"pool-{provider.name}", autoscaling_config=autoscaling, graceful_shutdown_timeout_s=60,
            max_replicas_per_node=cap,
        ).bind(provider.name, catalog_path, resolved["pool_secret"], router, catalog_sha=resolved["catalog_sha"])
    return Ingress.options(num_replicas=args.ingress_replicas, graceful_shutdown_timeout_s=60,
                           max_replicas_per_node=per_node_cap(args.ingress_replicas, nodes)).bind(
        resolved, pools, router, spreader)


app = build_app
__all__ = ["build_app", "AppArgs", "serve"]
