"""The spread supervisor: keeps every deployment at its replica count after a node is lost, and
spread over the nodes again when one joins, without anyone redeploying by hand.

The app builder caps replicas per node (``max_replicas_per_node = ceil(replicas / nodes)``,
app.py) so that one node never holds all of a deployment. The cap is counted when the app is
built; a lost node leaves its replicas unschedulable on the survivors (their caps are full), and a
node that joins is not used. This deployment watches the alive nodes and, once their number has
held for ``settle_s``, deploys the app again with that number (``live_nodes`` in its args): Serve
rebuilds it and rolls every deployment over under the new cap (requests in flight finish, as in
any redeploy). Measured choices (docs/OPERATIONS.md, "Capacity after a lost node"):

- A rebuild, not a per-deployment override of ``max_replicas_per_node``: Ray 2.60 ignores a
  config override that changes only that field, and a raised cap deadlocks the roll-over (the
  running replica holds the node's whole per-deployment resource, and Serve stops it only after
  its successor runs). The rebuild lifts the cap altogether on one node.
- No cap and Serve's own SPREAD would restore capacity sooner but does not spread: it put both
  ingress replicas on one node in one of three tries.
- Only declaratively deployed apps (``serve deploy``, KubeRay, ``trex-serve up``) can be deployed
  again from inside; an app deployed with ``serve.run`` is left alone (logged once), and
  ``spread_nodes`` fixed in the app's args turns the supervisor off."""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from typing import Any

import ray
from ray import serve

log = logging.getLogger("trex.spreader")


def alive_nodes() -> int:
    return max(1, sum(1 for n in ray.nodes() if n.get("Alive")))


def respread_config(details: dict[str, Any], app: str, nodes: int, built_for: int) -> dict[str, Any] | None:
    """The Serve config that deploys ``app`` again for ``nodes`` alive nodes, or None when nothing
    is to be done (already built for them, the count fixed by the operator, not declarative).
    ``details`` is the controller's ``get_serve_details()``; every other declaratively deployed
    app is kept as it is (a config leaves out an app only to delete it)."""
    apps = details.get("applications") or {}
    mine = apps.get(app) or {}
    config = mine.get("deployed_app_config")
    if not config:
        return None
    args = config.get("args") or {}
    if args.get("spread_nodes") or args.get("spread_supervisor") is False:
        return None
    if int(args.get("live_nodes") or built_for) == nodes:
        return None
    applications = []
    for name, state in apps.items():
        cfg = state.get("deployed_app_config")
        if not cfg:
            continue  # deployed with serve.run: a declarative config cannot carry it
        cfg = copy.deepcopy(cfg)
        if name == app:
            cfg["args"] = {**args, "live_nodes": nodes}
        applications.append(cfg)
    out: dict[str, Any] = {"applications": applications}
    for key in ("proxy_location", "http_options", "grpc_options", "target_capacity"):
        value = details.get(key)
        if value not in (None, {}):
            out[key] = getattr(value, "value", value)
    return out


@serve.deployment(num_replicas=1, max_ongoing_requests=10, ray_actor_options={"num_cpus": 0})
class Spreader:
    async def __init__(self, built_for: int, interval_s: float = 2.0, settle_s: float = 3.0) -> None:
        self.app = serve.get_replica_context().app_name
        self.built_for = built_for
        self.respreads = 0
        self._warned = False
        self._task = asyncio.get_running_loop().create_task(self._watch(interval_s, settle_s))

    async def _watch(self, interval_s: float, settle_s: float) -> None:
        seen, since = self.built_for, time.monotonic()
        while True:
            await asyncio.sleep(interval_s)
            try:
                nodes = await asyncio.to_thread(alive_nodes)
                if nodes != seen:  # wait for the count to hold: a node flapping is not worth a roll-over
                    seen, since = nodes, time.monotonic()
                elif time.monotonic() - since >= settle_s:
                    await asyncio.to_thread(self._respread, nodes)
            except Exception:  # a controller busy or restarting: try again on the next tick
                log.warning("spread supervisor: check failed", exc_info=True)

    def _respread(self, nodes: int) -> None:
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        client = _get_global_client()
        details = client.get_serve_details()
        if not (details.get("applications") or {}).get(self.app, {}).get("deployed_app_config"):
            if not self._warned:
                self._warned = True
                log.warning("spread supervisor: app %r was deployed with serve.run; it cannot deploy it "
                            "again after a node change (use serve deploy or trex-serve up)", self.app)
            return
        config = respread_config(details, self.app, nodes, self.built_for)
        if config is None:
            return
        log.warning("spread supervisor: %d node(s) alive; deploying app %r again so every deployment is at "
                    "its replica count and spread over them", nodes, self.app)
        client.deploy_apps(ServeDeploySchema.model_validate(config))
        self.respreads += 1

    async def __call__(self) -> dict[str, Any]:
        return {"built_for": self.built_for, "respreads": self.respreads}
