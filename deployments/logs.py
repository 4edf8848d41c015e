"""Route the core's loggers (``trex.*``) into Serve's replica logs. Serve writes what its own
``ray.serve`` logger emits to each replica's log file (JSON when the app's logging_config says
so); a logger of another name has no handler in a replica, and its records vanish."""

from __future__ import annotations

import logging


def route_core_logs(level: int = logging.INFO) -> None:
    core = logging.getLogger("trex")
    core.setLevel(level)
    for handler in logging.getLogger("ray.serve").handlers:
        if handler not in core.handlers:
            core.addHandler(handler)
    core.propagate = False  # one copy: Serve's handlers, not also the root's
