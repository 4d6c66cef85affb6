"""The arq worker: resources made once at startup, the job function, and its policies."""
from __future__ import annotations

from typing import Any

import aiohttp
from arq import Worker, func
from arq.connections import ArqRedis

from app.bitrix.client import RetryPolicy
from app.bitrix.ratelimit import RateLimiter
from app.config import LiveRules
from app.jobs import JobStore
from app.queue import PROCESS_EVENT, deserialize, serialize
from app.rules.model import RuleSet
from app.settings import Settings
from workers.tasks import RETRY_DELAYS, process_event

# A job reads a lead's activities and writes their bindings; even a 10,000-activity lead stays well
# inside ten minutes at the portal's rate. A dead worker's job is picked up again after this.
JOB_TIMEOUT = 600


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    # Tests and the combined `run` may hand in their own; a second startup reuses the first's.
    if "http" not in ctx:
        ctx["http"] = aiohttp.ClientSession(headers={"User-Agent": "b24rebind/0.1"})
    if "store" not in ctx:
        ctx["limiter"] = RateLimiter(ctx["redis"])
        ctx["store"] = JobStore(ctx["redis"], settings.job_retention_days * 86400)
    ctx.setdefault("retry_policy", RetryPolicy())
    ctx.setdefault("retry_delays", RETRY_DELAYS)


async def shutdown(ctx: dict[str, Any]) -> None:
    await ctx["http"].close()


def build_worker(settings: Settings, rules: RuleSet | LiveRules, redis: ArqRedis, **options: Any) -> Worker:
    """A worker for the event queue; tests pass `burst=True` and their own ctx entries."""
    live = rules if isinstance(rules, LiveRules) else LiveRules(rules)
    ctx = {"settings": settings, "rules": live, **options.pop("ctx", {})}
    delays = ctx.get("retry_delays", RETRY_DELAYS)
    return Worker(
        functions=[func(process_event, name=PROCESS_EVENT, max_tries=len(delays) + 1, timeout=JOB_TIMEOUT)],
        redis_pool=redis, ctx=ctx, on_startup=startup, on_shutdown=shutdown,
        job_serializer=serialize, job_deserializer=deserialize, keep_result=3600, **{"max_jobs": 10, **options},
    )
