"""The web application: the event endpoint, job lookups and health checks."""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from app.api.dashboard import setup_dashboard
from app.api.endpoints import setup_api
from app.api.keys import outage_key, queue_key, redis_key, rules_key, settings_key, store_key
from app.live_rules import LiveRules, load_service_rules
from app.intake.spool import spool_context, spool_key
from app.intake.webhook import MAX_BODY, receive_event
from app.logs import QuietBadRequests
from app.rebind.crm_mode import noted_modes, simple_mode_warning
from app.rules.model import RuleSet
from app.settings import Settings
from app.store.amnesia import watching_redis_memory
from app.store.jobs import TRIM_EVERY, JobStore
from app.store.outage import RedisOutage
from app.store.queue import JobQueue, connect
from app.words import plural

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(settings: Settings, rules: RuleSet | LiveRules | None = None) -> web.Application:
    """Build the web application; `settings` must name a running Redis (REDIS_URL or REDIS_SENTINELS)."""
    QuietBadRequests.install()
    app = web.Application(client_max_size=MAX_BODY, middlewares=[redis_away, api_auth])
    app[settings_key] = settings
    if rules is None:
        rules = LiveRules(load_service_rules(settings), settings)
    app[rules_key] = rules if isinstance(rules, LiveRules) else LiveRules(rules)
    app.cleanup_ctx.append(redis_context)
    app.cleanup_ctx.append(spool_context)  # after Redis: drains into it, and stops before it closes
    app.cleanup_ctx.append(trim_context)
    app.router.add_post("/bitrix/events", receive_event)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    setup_api(app)
    setup_dashboard(app)
    return app


WATCH_EVERY = 1.0  # seconds between the web process's looks at Redis


async def redis_context(app: web.Application) -> AsyncIterator[None]:
    """Redis for the web process, which starts and answers even while Redis is away: events go to the
    spool meanwhile. A watch says once when Redis goes and once when it is back."""
    settings = app[settings_key]
    if not settings.redis_given:
        raise RuntimeError("no Redis is set; `b24rebind serve` starts the bundled one when none is")
    redis = await connect(settings, wait=False)
    app[redis_key] = redis
    app[store_key] = JobStore.from_settings(redis, settings)
    app[queue_key] = JobQueue(redis, app[store_key], settings.redis_min_replicas)
    app[outage_key] = outage = RedisOutage("web")
    watch = asyncio.create_task(_watch_redis(redis, outage))
    async with watching_redis_memory(redis, "web", settings.data_dir):  # a Redis that forgot: said, repaired
        yield
    watch.cancel()
    await redis.aclose()


async def _watch_redis(redis: ArqRedis, outage: RedisOutage) -> None:
    while True:
        try:
            await redis.ping()
        except (RedisError, OSError) as exc:
            outage.down(exc)
        else:
            outage.up()
        await asyncio.sleep(WATCH_EVERY)


async def trim_context(app: web.Application) -> AsyncIterator[None]:
    """Forget job records past retention once a minute, off the request path (intake stays fast)."""
    async def trim_forever() -> None:
        while True:
            try:
                await app[store_key].trim()
            except (RedisError, OSError):
                pass  # Redis is away; the next minute will do
            await asyncio.sleep(TRIM_EVERY)

    trimmer = asyncio.create_task(trim_forever())
    yield
    trimmer.cancel()


@web.middleware
async def redis_away(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A read of jobs or metrics while Redis is away is a 503 that says so, not a 500 with a traceback
    (the outage itself is logged once, by the web process's watch)."""
    try:
        return await handler(request)
    except RedisError:
        outage = request.app[outage_key]
        return web.json_response({"error": f"Redis is {outage.status() if outage.down_for else 'unreachable'}; "
                                  "try again once it is back (GET /readyz says when)"}, status=503)


@web.middleware
async def api_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The status API needs `Authorization: Bearer <B24_API_TOKEN>`; without a token set it answers reads from
    loopback only (not through a proxy), and no writes at all."""
    if request.path.startswith("/api/") or request.path == "/metrics":
        token = request.app[settings_key].api_token
        if token is None and request.method not in ("GET", "HEAD"):
            # Retry, undo and replay change things: a loopback address alone (a proxy's, say) is not enough.
            return web.json_response({"error": "retry and replay need an API token: set B24_API_TOKEN and send "
                                      "Authorization: Bearer <token>"}, status=403)
        if token is None:
            # The Host header too: a page from elsewhere whose name resolves to 127.0.0.1 (DNS rebinding)
            # makes the browser send its own name there.
            if not _is_loopback(request.remote) or _forwarded(request) or not _loopback_host(request):
                return web.json_response({"error": "the API answers only on loopback until B24_API_TOKEN is set"},
                                         status=403)
        else:
            scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
            # Only as a bearer token (RFC 6750; the scheme's case does not matter): never bare, never in the URL.
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                     token.get_secret_value().encode()):
                return web.json_response({"error": "send Authorization: Bearer <B24_API_TOKEN>"}, status=401)
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    live = request.app[rules_key]
    checks: dict[str, object] = {"rules": f"{plural(len(live.current.rules), 'rule')}, "
                                          f"{plural(len(live.current.portals), 'portal')}"}
    if live.error:
        checks["rules_error"] = live.error
    spool = request.app.get(spool_key)
    spooled = spool.status() if spool is not None else {}
    if spool is not None:
        checks["spool"] = spooled
    outage = request.app[outage_key]
    try:
        await request.app[redis_key].ping()
        outage.up()
        checks["redis"] = "ok"
    except (RedisError, OSError) as exc:
        outage.down(exc)
        # Events are still accepted (into the spool): unavailable means "nothing is being worked on".
        checks["redis"] = outage.status()
        checks["redis_down_seconds"] = round(outage.down_for or 0.0, 1)
        return web.json_response({"status": "unavailable", **checks}, status=503)
    warnings = await _mode_warnings(request.app[redis_key], live.current)
    # Redis answers, yet events wait on disk: being drained now, or stuck (the log says why). Still 200:
    # this process takes events, and a probe that took it out of service would only lose it some.
    waiting = spooled.get("waiting_segments", 0)
    if waiting:
        checks["degraded"] = (f"{plural(int(waiting), 'spool segment')} of events accepted while Redis was "
                              "away wait to be queued; if this lasts, the log says why")
    return web.json_response({"status": "degraded" if waiting else "ready", **checks,
                              **({"warnings": warnings} if warnings else {})})


async def _mode_warnings(redis: Any, rules: RuleSet) -> list[str]:
    """Portals a worker found in simple CRM mode, where rules about leads can never fire."""
    if not rules.lead_rules():
        return []
    try:
        modes = await noted_modes(redis, list(rules.portals))
    except (RedisError, OSError):
        return []
    return [w for name, mode in modes.items() if (w := simple_mode_warning(rules, name, mode))]


def _forwarded(request: web.Request) -> bool:
    """A request a proxy passed on comes from its client, not from loopback, whatever its address."""
    return "X-Forwarded-For" in request.headers or "Forwarded" in request.headers


def _is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def _loopback_host(request: web.Request) -> bool:
    """The Host header names this machine. The header, not the request line: `GET http://localhost/...`
    with `Host: evil.com` is what a rebinding page's browser may send. No Host header: refused."""
    headers = request.headers.getall("Host", [])
    if len(headers) != 1:
        return False
    host = headers[0].strip().lower()
    if host.startswith("["):  # [::1]:8080
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host in LOOPBACK_NAMES or host.endswith(".localhost")
