"""Another conversion on a kept demo: `b24rebind demo --keep` leaves the demo portal running on a fixed
port with a control route, and `b24rebind demo convert` asks it through that route for another scene."""
from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from app.demo.playground import find_playground
from app.demo.portal import DEMO_WEBHOOK_CODE, DemoError, start_portal
from app.demo.stage import Stage
from app.demo.story import conversion, repeat_lead
from app.fakeportal import FakePortal
from app.settings import Settings

CONVERT_PATH = "/demo/convert"
STARTING_GRACE = 5.0  # seconds a demo just started in the background may take to write its profile
KEPT_STARTING = 90.0  # seconds a kept demo that has written its profile may take to answer


async def start_stage(stack: AsyncExitStack, port: int = 0) -> Stage:
    """The demo portal with its control route, ready for `play` once the service has started."""
    stage = Stage(fake=FakePortal(webhook_code=DEMO_WEBHOOK_CODE))
    stage.fake.extra_routes.append(("POST", CONVERT_PATH, convert_handler(stage)))
    await start_portal(stack, port, stage.fake)
    return stage


def convert_handler(stage: Stage) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """`b24rebind demo convert` asks the kept demo for another conversion through this."""

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.query.get("code") != stage.fake.webhook_code:
            return web.json_response({"error": "wrong demo code"}, status=401)
        try:
            activities = max(0, min(int(request.query.get("activities", 3)), 500))
            late = max(0, min(int(request.query.get("late", 0)), 50))
        except ValueError:
            return web.json_response({"error": "--activities and --late take whole numbers"}, status=400)
        try:  # a conversion asked for while the opening story plays waits for its end
            await asyncio.wait_for(stage.played.wait(), timeout=120)
        except asyncio.TimeoutError:
            return web.json_response({"error": "the demo is still starting; try again in a moment"}, status=503)
        async with stage.turn:
            stage.lines = []
            lead = await conversion(stage, activities=activities, late=late, name=_next_name(stage.fake))
            if request.query.get("repeat") == "1":
                await repeat_lead(stage, lead)
            return web.json_response({"lines": stage.lines})

    return handle


def _next_name(fake: FakePortal) -> str:
    names = ["Boris Ivanov", "Clara Sidorova", "Dmitri Orlov", "Elena Smirnova", "Fyodor Kuznetsov"]
    return names[len(fake.leads) % len(names)]


async def convert_command(activities: int, late: int, repeat: bool, settings: Settings) -> int:
    """`b24rebind demo convert`: another conversion on the demo kept running by `demo --keep`."""
    port = settings.demo_port
    query: dict[str, Any] = {"code": DEMO_WEBHOOK_CODE, "activities": activities, "late": late,
                             "repeat": "1" if repeat else "0"}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTING_GRACE
    waiting = False
    async with aiohttp.ClientSession() as http:
        while True:
            kept = find_playground(settings.data_dir)  # the demo's settings: its own data directory
            if kept is not None and kept.portal:
                port = urlsplit(kept.portal).port or port
            try:
                async with http.post(f"http://127.0.0.1:{port}{CONVERT_PATH}", params=query,
                                     timeout=aiohttp.ClientTimeout(total=300)) as response:
                    body = await response.json(content_type=None)
                break
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                # A demo just started (`demo --keep &`) is given time to come up; with none, say so soon.
                if kept is not None and not waiting:
                    waiting = True
                    deadline = max(deadline, loop.time() + KEPT_STARTING)
                    print(f"waiting for the demo (pid {kept.pid}) to start…", file=sys.stderr, flush=True)
                if loop.time() > deadline:
                    raise DemoError(f"no demo portal answers on 127.0.0.1:{port}: start one with `b24rebind demo "
                                    "--keep` in another terminal, then run this again", portal_down=True) from None
                await asyncio.sleep(0.3)
    if "error" in body:
        raise DemoError(f"the demo refused: {body['error']}")
    print("\n".join(body["lines"]))
    return 0
