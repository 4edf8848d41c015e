"""The dashboard: one static page (plain HTML, vanilla JS, inline SVG charts) served by the gateway
at ``/dashboard``. It talks only to the account API (``/v1/dashboard/...``) with the token the user
signs in with, so it needs no session or server-side state of its own."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from trex_serve.errors import NotFound

STATIC_DIR = Path(__file__).parent / "static"

_CONTENT_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}

# Everything comes from this origin; no inline script, no framing, no referrer to other sites.
_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def build_dashboard_router(static_dir: Path = STATIC_DIR) -> APIRouter:
    """``GET /dashboard`` (the page) and ``GET /dashboard/static/<file>`` (its assets), read once."""
    index = (static_dir / "index.html").read_bytes()
    assets = {
        path.name: (path.read_bytes(), _CONTENT_TYPES[path.suffix])
        for path in static_dir.iterdir()
        if path.is_file() and path.suffix in _CONTENT_TYPES
    }
    router = APIRouter(tags=["dashboard"])

    @router.get("/dashboard")
    @router.get("/dashboard/")
    async def page() -> Response:
        return Response(index, media_type="text/html; charset=utf-8", headers=_HEADERS)

    @router.get("/dashboard/static/{name}")
    async def asset(name: str) -> Response:
        found = assets.get(name)
        if found is None:
            raise NotFound(f"No dashboard asset {name!r}")
        body, content_type = found
        return Response(body, media_type=content_type, headers=_HEADERS)

    return router
