"""B24_ALERT_WEBHOOK: a post when a portal stops answering and one when it answers again, no more."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr

from app.api import alerting
from app.store.counters import REACHABILITY
from app.live_rules import LiveRules
from app.fakeportal import LEAD, FakePortal
from app.store.namespace import prefixed
from app.web import create_app
from tests.conftest import post_event


async def wait_for(condition: Any, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.05)


async def test_a_portal_that_stops_answering_and_comes_back_is_posted_once_each_way(
        aiohttp_client: Any, aiohttp_server: Any, settings: Any, rules: Any, redis: Any, make_worker: Any,
        portal: FakePortal, portal_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alerting, "CHECK_EVERY", 0.05)
    monkeypatch.setattr(alerting, "THROTTLE", 1)
    posts: list[dict[str, Any]] = []

    async def receive(request: web.Request) -> web.Response:
        posts.append(await request.json())
        return web.Response(text="ok")

    receiver = web.Application()
    receiver.router.add_post("/hooks/s3cret", receive)
    hook = await aiohttp_server(receiver)
    watched = settings.model_copy(update={"alert_webhook": SecretStr(str(hook.make_url("/hooks/s3cret")))})
    away = portal_config.model_copy(update={"rest_url": SecretStr("http://127.0.0.1:9/rest/1/code/")})
    gone = rules.model_copy(update={"portals": {"acme": away}})
    client = await aiohttp_client(create_app(watched, gone))

    await post_event(client, "ONCRMACTIVITYADD", 5)
    await make_worker(rules=gone).run_check()  # every request fails to connect

    await wait_for(lambda: len(posts) == 1)
    assert posts[0]["state"] == "unreachable" and posts[0]["portal"] == "acme"
    assert posts[0]["text"].startswith("b24rebind: portal acme (acme.bitrix24.com) cannot be reached")
    assert "last answer: never" in posts[0]["text"]

    lead = portal.add_lead()
    portal.convert_lead(lead)
    await post_event(client, "ONCRMACTIVITYADD", portal.add_activity([(LEAD, lead)]))
    await make_worker(rules=rules).run_check()  # the portal answers again

    await wait_for(lambda: len(posts) == 2)  # once the first post's window is over
    assert posts[1]["state"] == "reachable" and "answers again" in posts[1]["text"]
    async with aiohttp.ClientSession() as session:  # nothing new: no post, however often it looks
        assert await alerting.check(redis, LiveRules(gone), session, str(hook.make_url("/hooks/s3cret"))) == []
    assert len(posts) == 2


def test_the_setting_takes_only_a_web_url(settings: Any) -> None:
    from pydantic import ValidationError

    from app.settings import Settings

    assert Settings(_env_file=None, B24_ALERT_WEBHOOK="").alert_webhook is None
    with pytest.raises(ValidationError, match="must be an http"):
        Settings(_env_file=None, B24_ALERT_WEBHOOK="hooks.example.com/x")


async def test_a_post_the_webhook_refuses_is_tried_again_and_the_log_never_shows_the_url(
        aiohttp_server: Any, redis: Any, rules: Any, caplog: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alerting, "throttled", alerting.Throttled(alerting.log, every=0.0))
    answers = [500, 200]
    posts: list[dict[str, Any]] = []

    async def receive(request: web.Request) -> web.Response:
        posts.append(await request.json())
        return web.Response(status=answers.pop(0))

    receiver = web.Application()
    receiver.router.add_post("/hooks/s3cret", receive)
    url = str((await aiohttp_server(receiver)).make_url("/hooks/s3cret"))
    await redis.hset(prefixed(REACHABILITY + "acme"), mapping={"unreachable_at": time.time()})  # as a worker's request left it

    async with aiohttp.ClientSession() as session:
        assert await alerting.check(redis, LiveRules(rules), session, url) == []  # refused: not counted as posted
        assert [p["state"] for p in await alerting.check(redis, LiveRules(rules), session, url)] == ["unreachable"]

    assert len(posts) == 2
    assert any("answered HTTP 500" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if "s3cret" in r.getMessage()]
