"""Deploys the app onto the running local Ray cluster (called by `trex-serve up` and `redeploy` with
the Ray throughput settings in its environment). Kept apart from cli.py so the core CLI never imports
Ray.

The app is deployed the way `serve deploy config/serve.yaml` deploys it — a declarative config whose
builder (deployments.app:build_app) runs in the cluster — not with `serve.run`: the spread supervisor
(spreader.py) can then deploy it again itself when nodes are lost or join. The builder reads the
TREX_* settings from the cluster's environment (that of `ray start`, which `up` sets); what `redeploy`
may change (catalog path, replica counts, pool autoscaling) travels in the args, with a new
``revision`` each time so that every redeploy rolls the replicas over as before."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Mapping
from typing import Any

APP = "trex"


def deploy_config(http_port: int, env: Mapping[str, str]) -> dict[str, Any]:
    args: dict[str, Any] = {"revision": uuid.uuid4().hex[:12]}
    if env.get("TREX_CATALOG"):
        args["catalog_path"] = env["TREX_CATALOG"]
    if env.get("TREX_INGRESS_REPLICAS"):
        args["ingress_replicas"] = int(env["TREX_INGRESS_REPLICAS"])
    if env.get("TREX_POOL_AUTOSCALING"):
        args["pool_autoscaling"] = json.loads(env["TREX_POOL_AUTOSCALING"])
    # One machine: one proxy, on the head (with several local nodes, a proxy per node would fight
    # over the one port).
    return {"proxy_location": "HeadOnly", "http_options": {"host": "0.0.0.0", "port": http_port},
            "applications": [{"name": APP, "route_prefix": "/", "import_path": "deployments.app:build_app",
                              "args": args}]}


def main() -> int:
    http_port, ray_port = int(sys.argv[1]), int(sys.argv[2])
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    ray.init(address=f"127.0.0.1:{ray_port}", logging_level="WARNING", log_to_driver=False)
    serve.start(proxy_location="HeadOnly", http_options={"host": "0.0.0.0", "port": http_port})
    config = deploy_config(http_port, os.environ)
    revision = config["applications"][0]["args"]["revision"]
    client = _get_global_client()
    client.deploy_apps(ServeDeploySchema.model_validate(config))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # this revision built and rolled out, or why not
        app = (client.get_serve_details().get("applications") or {}).get(APP) or {}
        status = str(getattr(app.get("status"), "value", app.get("status")))
        ours = ((app.get("deployed_app_config") or {}).get("args") or {}).get("revision") == revision
        if ours and status == "RUNNING":
            return 0
        if ours and status == "DEPLOY_FAILED":
            sys.stderr.write(f"deploying the app failed: {app.get('message')}\n")
            return 1
        time.sleep(0.5)
    sys.stderr.write("the app was not running 300 s after it was deployed\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
