"""B24_ALERT_WEBHOOK: a JSON post when a portal stops answering and when it answers again.

The web process looks at each portal's reachability (what the workers saw on their last requests,
`app.api.stats`) every CHECK_EVERY seconds. A change from what was last posted is posted, once for the
installation: the state last posted lives in Redis, and a gate key set with NX lets one process post
for a portal at most once every THROTTLE seconds, so a flapping portal costs a post per window, not
one per blip, and its latest state is posted when the window ends. A post that fails is tried again
at the next look. The body carries `text` (what Slack, Mattermost and Rocket.Chat incoming webhooks
show) and the fields for anything else.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.api.keys import redis_key, rules_key, settings_key
from app.store.counters import REACHABILITY
from app.api.stats import reachability_of
from app.live_rules import LiveRules
from app.logs import Throttled
from app.store.namespace import prefixed
from app.store.redis_typing import awaited

log = logging.getLogger(__name__)
throttled = Throttled(log, every=300.0)

CHECK_EVERY = 15.0  # seconds between looks at the portals' reachability
THROTTLE = 300  # seconds: at most one post per portal in this window
POST_TIMEOUT = 10.0
LOOK_TIMEOUT = 60.0  # one look, every portal's post included
POSTED = "b24:alert:posted:"  # + portal -> the state last posted: reachable | unreachable
GATE = "b24:alert:gate:"  # + portal -> set (with a TTL of THROTTLE) by the process that posts


async def alert_context(app: web.Application) -> AsyncIterator[None]:
    """Watch the portals while the web app runs, when B24_ALERT_WEBHOOK is set."""
    webhook = app[settings_key].alert_webhook
    if webhook is None:
        yield
        return
    watcher = asyncio.create_task(watch(app[redis_key], app[rules_key], webhook.get_secret_value()))
    yield
    watcher.cancel()


async def watch(redis: Redis, rules: LiveRules, url: str) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT)) as session:
        while True:
            try:
                async with asyncio.timeout(LOOK_TIMEOUT):
                    await check(redis, rules, session, url)
            except (RedisError, OSError, TimeoutError):
                pass  # Redis is away or stalled: the dashboard and /readyz say so; the next look tries again
            await asyncio.sleep(CHECK_EVERY)


async def check(redis: Redis, rules: LiveRules, session: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    """One look: posts each portal whose state changed since the last post (gate permitting); returns them."""
    posted = []
    for name, portal in rules.current.portals.items():
        answered, unreachable = await awaited(redis.hmget(prefixed(REACHABILITY + name),
                                                          ["answered_at", "unreachable_at"]))
        reach = reachability_of(answered, unreachable)
        last = await redis.get(prefixed(POSTED + name))
        state = reach["state"]
        if state == "unknown" or state == (last.decode() if last else "reachable"):
            continue  # nothing new (a portal first seen reachable is not news)
        if not await redis.set(prefixed(GATE + name), state, nx=True, ex=THROTTLE):
            continue  # posted within the window (here or by another process): the window's end posts this
        body = alert_body(name, portal.domain, reach)
        if await _post(session, url, body):
            await redis.set(prefixed(POSTED + name), state)
            posted.append(body)
        else:
            await redis.delete(prefixed(GATE + name))  # not posted: the next look tries again
    return posted


def alert_body(name: str, domain: str, reach: dict[str, Any]) -> dict[str, Any]:
    at = datetime.fromtimestamp(reach["at"], UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if reach["state"] == "unreachable":
        last = (datetime.fromtimestamp(reach["last_answer"], UTC).strftime("%H:%M:%S UTC")
                if reach["last_answer"] else "never")
        text = (f"b24rebind: portal {name} ({domain}) cannot be reached (seen at {at}; last answer: {last}). "
                "Its jobs wait and retry; check rest_url and the network from the workers.")
    else:
        text = f"b24rebind: portal {name} ({domain}) answers again (at {at}); waiting jobs go on."
    return {"text": text, "service": "b24rebind", "portal": name, "domain": domain, "state": reach["state"],
            "at": reach["at"], "last_answer": reach["last_answer"]}


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> bool:
    try:
        async with session.post(url, json=body) as response:
            if response.status < 300:
                return True
            throttled.warning("answer", "B24_ALERT_WEBHOOK answered HTTP %d; the alert about portal %s is "
                              "tried again in %g s", response.status, body["portal"], CHECK_EVERY)
    except (aiohttp.ClientError, TimeoutError) as exc:  # the URL is a secret: never in the line
        throttled.warning("unreachable", "could not post to B24_ALERT_WEBHOOK (%s); the alert about portal %s "
                          "is tried again in %g s", type(exc).__name__, body["portal"], CHECK_EVERY)
    return False
