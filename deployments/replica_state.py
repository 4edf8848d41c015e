"""What one replica's HTTP app serves, set once the replica's collaborators exist. A real module
(not a closure) so the app and the deployment class, however Serve ships them to the replica,
reach the same state."""

from __future__ import annotations

import asyncio
from typing import Any

_state: dict[str, Any] = {}
_ready: asyncio.Event | None = None


def _event() -> asyncio.Event:
    global _ready
    if _ready is None:
        _ready = asyncio.Event()
    return _ready


def publish(pipeline: Any, admin_app: Any = None) -> None:
    _state["pipeline"] = pipeline
    _state["admin"] = admin_app
    _event().set()


async def pipeline() -> Any:
    if "pipeline" not in _state:
        await _event().wait()
    return _state["pipeline"]


async def admin_app() -> Any:
    if "pipeline" not in _state:
        await _event().wait()
    return _state.get("admin")
