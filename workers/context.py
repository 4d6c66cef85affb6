"""What a worker's jobs share, made once at startup: one typed object under one key of arq's `ctx`.

arq hands each job a shallow copy of the worker's `ctx` dict, so what jobs share must exist before the
first job starts; arq's own per-job entries (`job_id`, `job_try`) stay where arq puts them.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
from arq.connections import ArqRedis

from app.bitrix.budget import BudgetReads
from app.bitrix.client import RetryPolicy
from app.bitrix.ratelimit import RateLimiter
from app.bitrix.session import PortalSession
from app.live_rules import LiveRules
from app.settings import Settings
from app.store.jobs import JobStore

CONTEXT = "b24rebind"  # the one key of arq's ctx the worker uses

# Seconds before each retry of a job that failed for a passing reason (5xx, timeouts, limits).
RETRY_DELAYS = (5.0, 15.0, 60.0, 300.0, 900.0)
# A job reads a lead's activities and writes their bindings; even a 10,000-activity lead stays well
# inside ten minutes at the portal's rate. Past this the job stops, records why and runs again later.
JOB_TIMEOUT = 600


def new_http_session() -> aiohttp.ClientSession:
    # A portal's REST API sets no cookies worth keeping; the default jar would filter every request.
    return aiohttp.ClientSession(headers={"User-Agent": "b24rebind/0.1"}, cookie_jar=aiohttp.DummyCookieJar())


@dataclass
class PortalSenders:
    """The HTTP session and the one sender per portal (`PortalSession`) of a worker, or of the workers of
    one process (live and backfill) sharing them, so that one sender sees all of its work for a portal."""

    http: aiohttp.ClientSession = field(default_factory=new_http_session)
    by_portal: dict[str, PortalSession] = field(default_factory=dict)
    retired: list[PortalSession] = field(default_factory=list)  # of portals the rules file has changed since
    handovers: set[asyncio.Task[None]] = field(default_factory=set)

    def retire(self, session: PortalSession) -> None:
        """The rules file changed the session's portal: its jobs finish on it, and if it sends the portal's
        requests for the other processes, the session with the new settings takes that over."""
        self.retired.append(session)
        if session.relay is not None:
            task = asyncio.create_task(session.relay.retire())
            self.handovers.add(task)
            task.add_done_callback(self.handovers.discard)

    async def close(self) -> None:
        await asyncio.gather(*self.handovers, return_exceptions=True)
        for session in [*self.by_portal.values(), *self.retired]:
            await session.close()
        await self.http.close()


@dataclass
class WorkerContext:
    settings: Settings
    rules: LiveRules
    redis: ArqRedis
    senders: PortalSenders
    limiter: RateLimiter
    store: JobStore
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)
    retry_delays: tuple[float, ...] = RETRY_DELAYS
    job_timeout: float = JOB_TIMEOUT  # the job's own limit; arq's is a grace period longer
    budget_reads: BudgetReads = field(default_factory=BudgetReads)
    owns_senders: bool = True  # False: the process's workers share them, closed once all have stopped
    # One process at a time sends each portal's requests for all (app/bitrix/relay.py); False: each its own.
    relay: bool = True

    @classmethod
    def make(cls, settings: Settings, rules: LiveRules, redis: ArqRedis, **options: Any) -> WorkerContext:
        """The context of a worker (or a command doing a worker's work) on `redis`; options override
        the defaults (tests use faster retries)."""
        shared = options.pop("senders", None)
        return cls(settings=settings, rules=rules, redis=redis, senders=shared or PortalSenders(),
                   owns_senders=shared is None, limiter=RateLimiter(redis),
                   store=JobStore.from_settings(redis, settings), **options)

    @property
    def http(self) -> aiohttp.ClientSession:
        return self.senders.http

    async def close(self) -> None:
        if self.owns_senders:
            await self.senders.close()


def context_of(ctx: dict[str, Any]) -> WorkerContext:
    """The worker's context in arq's `ctx` (a job's copy or the worker's own)."""
    return cast(WorkerContext, ctx[CONTEXT])
