"""The dashboard at `/`: one static page and its script, which read the JSON API; no build step."""
from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).parent


async def index(request: web.Request) -> web.FileResponse:
    # The page holds no data: every number on it comes from the API, under the API's own auth.
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def setup_dashboard(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_static("/dashboard/", STATIC, append_version=False)
