"""The dashboard at `/`: one static page and its script, which read the JSON API; no build step."""
from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).parent
# What the browser loads; the package's Python files (and anything else beside them) are not served.
ASSET_SUFFIXES = {".html", ".js", ".css", ".svg", ".png", ".ico"}


async def index(request: web.Request) -> web.FileResponse:
    # The page holds no data: every number on it comes from the API, under the API's own auth.
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def asset(request: web.Request) -> web.FileResponse:
    name = request.match_info["filename"]
    path = STATIC / name
    if Path(name).suffix not in ASSET_SUFFIXES or path.parent != STATIC or not path.is_file():
        raise web.HTTPNotFound(text="no such dashboard file")
    return web.FileResponse(path)


async def favicon(request: web.Request) -> web.FileResponse:
    # Browsers ask for /favicon.ico whatever the page links: the same icon, not a 404 in every log.
    return web.FileResponse(STATIC / "favicon.svg", headers={"Content-Type": "image/svg+xml",
                                                             "Cache-Control": "max-age=86400"})


def setup_dashboard(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/dashboard/{filename}", asset)
    app.router.add_get("/favicon.ico", favicon)
