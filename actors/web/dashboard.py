"""The web dashboard: one page at `/` and its static files under `/static/`.

The page is plain HTML/JS/CSS (no build step, no network fetches) that talks to the control
endpoint's JSON and SSE routes like any other client. Its charts are drawn by uPlot, shipped
here as the npm package's own files (dist/uPlot.iife.min.js, dist/uPlot.min.css and its
LICENSE, unchanged; the version is in the script's first line and in README). The page
itself needs no API key; the calls it makes send the key the user typed (kept in
sessionStorage).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).with_name("static")

# The only files served, with their content types: nothing else under static/ is reachable.
STATIC_FILES: dict[str, str] = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "app.css": "text/css",
    "uPlot.iife.min.js": "text/javascript",  # uPlot 1.6.32 (MIT), vendored
    "uPlot.min.css": "text/css",
    "uPlot.LICENSE.txt": "text/plain",
}
_HEADERS = {
    "Cache-Control": "no-cache",  # revalidate: a new version shows up on the next reload
    "X-Content-Type-Options": "nosniff",
}
_INSTALLED = web.AppKey("dashboard_installed", bool)


def _file(name: str) -> web.Response:
    body = (STATIC_DIR / name).read_bytes()
    return web.Response(
        body=body, content_type=STATIC_FILES[name], charset="utf-8", headers=_HEADERS
    )


async def index(request: web.Request) -> web.StreamResponse:
    return _file("index.html")


async def static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        raise web.HTTPNotFound()
    return _file(name)


def add_routes(app: web.Application) -> None:
    """Register `/` and `/static/{name}` (idempotent: a second call adds nothing)."""
    if app.get(_INSTALLED):
        return
    app[_INSTALLED] = True
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
