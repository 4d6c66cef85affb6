"""The arq worker: resources made once at startup, the job function, and its policies."""
from __future__ import annotations

import logging
from typing import Any

import aiohttp
from arq import cron, func
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from app.bitrix.budget import BudgetReads
from app.bitrix.client import RetryPolicy
from app.bitrix.ratelimit import RateLimiter
from app.config import LiveRules
from app.rebind.joined_reads import JoinedReads
from app.rules.model import RuleSet
from app.settings import Settings
from app.store.jobs import JobStore
from app.store.namespace import prefixed
from app.store.queue import (
    LIVE_QUEUE,
    PROCESS_EVENT,
    RESCUE_CRON,
    SWEEP_CRON,
    JobQueue,
    deserialize,
    serialize,
)
from workers.reconcile import TICK, reconcile_job
from workers.runner import LeasedWorker
from workers.tasks import JOB_TIMEOUT, RETRY_DELAYS, process_event

log = logging.getLogger(__name__)

# Retries are counted on the job record (waiting for a lock or a time budget is free); this only
# stops a job that keeps waiting for hours.
MAX_TRIES = 200
POLL_DELAY = 0.1  # seconds between reads of the queue
# Backfill jobs a process runs at once: their reads and writes pack into shared batches, which leave
# fuller the more jobs wait for them (issue 16's backfill: 144 requests with 20, 114-119 with 100).
BACKFILL_JOBS = 100
SHARED = "shares_portal_sessions"


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    # Tests and the combined `run` may hand in their own; a second startup reuses the first's.
    if "http" not in ctx:
        ctx["http"] = _http()
    if "store" not in ctx:
        ctx["limiter"] = RateLimiter(ctx["redis"])
        ctx["store"] = JobStore.from_settings(ctx["redis"], settings)
    ctx.setdefault("retry_policy", RetryPolicy())
    # arq hands each job a copy of ctx: what jobs share must be made here, not on first use.
    ctx.setdefault("budget_reads", BudgetReads())
    ctx.setdefault("portal_sessions", {})  # portal name -> PortalSession, the one sender of its requests
    ctx.setdefault("joined_reads", JoinedReads(ctx["redis"]))
    ctx.setdefault("retry_delays", RETRY_DELAYS)


async def shutdown(ctx: dict[str, Any]) -> None:
    if "joined_reads" in ctx:
        await ctx["joined_reads"].close()
    if ctx.get(SHARED):  # the process's workers share them: closed once the last has stopped
        return
    await close_portal_sessions(ctx)


def shared_portal_sessions() -> dict[str, Any]:
    """A ctx part for a process's workers (live and backfill): one HTTP session and one PortalSession
    per portal between them, so that one sender sees all of the process's work for a portal."""
    return {SHARED: True, "http": _http(), "portal_sessions": {}}


async def close_portal_sessions(ctx: dict[str, Any]) -> None:
    for session in [*ctx.get("portal_sessions", {}).values(), *ctx.get("retired_sessions", [])]:
        await session.close()
    if "http" in ctx:  # not there when the worker stops before it started (waiting for Redis, say)
        await ctx["http"].close()


def _http() -> aiohttp.ClientSession:
    # A portal's REST API sets no cookies worth keeping; the default jar would filter every request.
    return aiohttp.ClientSession(headers={"User-Agent": "b24rebind/0.1"}, cookie_jar=aiohttp.DummyCookieJar())


async def requeue_stranded(ctx: dict[str, Any]) -> int:
    """The minute's look for jobs whose records wait to run but that have left the queue."""
    try:
        rescued = await JobQueue(ctx["redis"], ctx["store"]).requeue_stranded()
    except RedisError as exc:  # the worker says once that Redis is away; the next minute looks again
        log.info("the look for stranded jobs was skipped: Redis is unreachable (%s)", type(exc).__name__)
        return 0
    if rescued:
        log.warning("queued again %d jobs that had left the queue without ending (%s)", len(rescued),
                    ", ".join(rescued[:5]) + (", ..." if len(rescued) > 5 else ""))
    return len(rescued)


def build_worker(settings: Settings, rules: RuleSet | LiveRules, redis: ArqRedis, **options: Any) -> LeasedWorker:
    """A worker for the event queue; tests pass `burst=True` and their own ctx entries."""
    live = rules if isinstance(rules, LiveRules) else LiveRules(rules)
    ctx = {"settings": settings, "rules": live, **options.pop("ctx", {})}
    # Long-running live workers sweep for missed events; a gate in Redis keeps it to one sweep an interval.
    queue = options.pop("queue_name", LIVE_QUEUE)
    sweeps = settings.reconcile_interval and not options.get("burst") and queue == LIVE_QUEUE
    # arq makes a cron's job ids from its name (`<name>:<time>`): prefixed, each installation sharing a
    # Redis runs its own sweep. Unprefixed it is arq's default name.
    sweep_cron = cron(reconcile_job, name=prefixed(SWEEP_CRON), second=set(range(0, 60, TICK)),
                      timeout=JOB_TIMEOUT, max_tries=1)
    # One worker a minute (arq's cron job ids are unique per run time) looks for stranded jobs.
    rescue_cron = cron(requeue_stranded, name=prefixed(RESCUE_CRON), second=0, timeout=60, max_tries=1)
    long_running = not options.get("burst") and queue == LIVE_QUEUE
    crons = [*([sweep_cron] if sweeps else []), *([rescue_cron] if long_running else [])]
    return LeasedWorker(
        functions=[func(process_event, name=PROCESS_EVENT, max_tries=MAX_TRIES, timeout=JOB_TIMEOUT)],
        cron_jobs=crons or None, queue_name=prefixed(queue),
        redis_pool=redis, ctx=ctx, on_startup=startup, on_shutdown=shutdown,
        job_serializer=serialize, job_deserializer=deserialize, keep_result=3600,
        # arq polls every 0.5 s by default: an event would wait up to that long for an idle worker, and a
        # busy one reads at most 100 queued ids a poll. Polling costs an idle worker one Redis round trip.
        **{"max_jobs": settings.worker_jobs, "poll_delay": POLL_DELAY, **options},
    )
