"""Deploys the app onto the running local Ray cluster (called by `trex-serve up` with the Ray
throughput settings in its environment). Kept apart from cli.py so the core CLI never imports Ray."""

from __future__ import annotations

import sys


def main() -> int:
    http_port, ray_port = int(sys.argv[1]), int(sys.argv[2])
    import ray
    from ray import serve

    from deployments.app import build_app

    ray.init(address=f"127.0.0.1:{ray_port}", logging_level="WARNING", log_to_driver=False)
    # One machine: one proxy, on the head (with several local nodes, a proxy per node would fight
    # over the one port).
    serve.start(proxy_location="HeadOnly", http_options={"host": "0.0.0.0", "port": http_port})
    serve.run(build_app({}), name="trex", route_prefix="/", blocking=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
