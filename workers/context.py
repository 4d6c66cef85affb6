"""What a worker's jobs share, made once at startup: one typed object under one key of arq's `ctx`.

arq hands each job a shallow copy of the worker's `ctx` dict, so what jobs share must exist before the
first job starts; arq's own per-job entries (`job_id`, `job_try`) stay where arq puts them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
from arq.connections import ArqRedis

from app.bitrix.budget import BudgetReads
from app.bitrix.client import RetryPolicy
from app.bitrix.ratelimit import RateLimiter
from app.bitrix.batcher import PortalBatcher
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


class PortalTurns:
    """How many jobs of each portal are under way in this process, so that one portal's backlog never
    takes every worker slot: a job beyond its portal's share (`Settings.portal_jobs`), or beyond the
    slots the other portals leave free (`_has_room`), is handed back to arq's queue (`Retry(defer=...)`)
    without a slot, to come back at a turn of its own.

    Turns are spaced by how fast the portal's jobs have been ending here, so a backlog's jobs come
    back about when slots free, each about once, rather than all at once. Live jobs and backfill
    jobs count apart (live events go first within a portal anyway: the batcher sends their commands
    before backfill's). A portal with nothing under way has no entry: an idle portal costs nothing.
    """

    FIRST_GAP = 0.05  # seconds between turns before any job of the portal has ended here
    LONGEST_WAIT = 30.0  # a turn is never further away than this; a job past it may be deferred again

    KNOWN_WAITERS = 100_000  # ids of waiting jobs remembered at most (the oldest are forgotten first)

    def __init__(self) -> None:
        # Jobs this process sent back to the queue to wait (a turn, a lead's lock, a time budget), and their
        # portals: a poll claims first those whose portal has room, then the jobs it has not seen, then the
        # rest (which would only wait again), so a new event is never queued behind their claims.
        self.waiting: dict[str, tuple[str, bool, bool]] = {}  # job id: portal, low, waits for a turn
        self._running: dict[tuple[str, bool], int] = {}
        self._gap: dict[tuple[str, bool], float] = {}  # seconds between two jobs ending (moving average)
        self._last_end: dict[tuple[str, bool], float] = {}
        self._next_turn: dict[tuple[str, bool], float] = {}

    def running(self, portal: str, low: bool = False) -> int:
        return self._running.get((portal, low), 0)

    def take(self, portal: str, low: bool, share: int, slots: int = 0) -> float:
        """0: the job may run now (give it back with `give_back`); else the seconds it should wait.
        `slots`: the process's slots for such jobs (`_has_room`)."""
        key = (portal, low)
        now = time.monotonic()
        if self._has_room(key, share, slots):
            self._running[key] = self._running.get(key, 0) + 1
            return 0.0
        gap = self._gap.get(key, self.FIRST_GAP)
        turn = min(max(now, self._next_turn.get(key, now)) + gap, now + self.LONGEST_WAIT)
        self._next_turn[key] = turn
        return max(turn - now, gap)

    def _has_room(self, key: tuple[str, bool], share: int, slots: int) -> bool:
        """A portal's jobs run up to its share; past it, a job takes a slot no other portal uses, as long as
        a share of the slots stays free for them. At its limit a portal's calls leave only as full as its
        jobs waiting for them make them: 100 jobs of a flood, four calls in a row each, fill half-empty
        calls at every stage; 200, full ones (docs/benchmarks.md, "Neighbours")."""
        if self._running.get(key, 0) < share:
            return True
        under_way = sum(n for (_, low), n in self._running.items() if low == key[1])
        return under_way + share < slots

    def note_waiting(self, job_id: str, portal: str, low: bool, waits: bool, turn: bool = False) -> None:
        """`turn`: it waits for its portal's turn (else for a lead's lock or a time budget)."""
        if not waits:
            self.waiting.pop(job_id, None)
            return
        self.waiting[job_id] = (portal, low, turn)
        if len(self.waiting) > self.KNOWN_WAITERS:
            del self.waiting[next(iter(self.waiting))]

    def claim_order(self, job_ids: list[bytes], share: int, slots: int = 0) -> list[bytes]:
        """Jobs waiting for a turn whose portal has room now first, then new ones, then the other waiting
        jobs (for a turn that is not there yet, a lead's lock, a time budget)."""
        def rank(job_id: bytes) -> int:
            known = self.waiting.get(job_id.decode())
            if known is None:
                return 1
            portal, low, turn = known
            return 0 if turn and self._has_room((portal, low), share, slots) else 2
        return sorted(job_ids, key=rank)

    def give_back(self, portal: str, low: bool) -> None:
        key = (portal, low)
        now = time.monotonic()
        left = self._running[key] = self._running.get(key, 1) - 1
        if key in self._last_end:
            self._gap[key] = 0.8 * self._gap.get(key, self.FIRST_GAP) + 0.2 * min(now - self._last_end[key], 5.0)
        self._last_end[key] = now
        if left <= 0 and self._next_turn.get(key, 0.0) <= now:  # idle: forget the portal
            for table in (self._running, self._gap, self._last_end, self._next_turn):
                table.pop(key, None)


@dataclass
class PortalTraffic:
    """A process's traffic with its portals: the HTTP session, the one sender per portal (`PortalBatcher`)
    and the portals' turns, of a worker or of the workers of one process (live and backfill) sharing
    them, so that one sender sees all of the process's work for a portal."""

    http: aiohttp.ClientSession = field(default_factory=new_http_session)
    batchers: dict[str, PortalBatcher] = field(default_factory=dict)
    retired: list[PortalBatcher] = field(default_factory=list)  # of portals the rules file has changed since
    turns: PortalTurns = field(default_factory=lambda: PortalTurns())

    def retire(self, session: PortalBatcher) -> None:
        """The rules file changed the batcher's portal: its jobs finish on it."""
        self.retired.append(session)

    async def close(self) -> None:
        for session in [*self.batchers.values(), *self.retired]:
            await session.close()
        await self.http.close()


@dataclass
class WorkerContext:
    settings: Settings
    rules: LiveRules
    redis: ArqRedis
    traffic: PortalTraffic
    limiter: RateLimiter
    store: JobStore
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)
    retry_delays: tuple[float, ...] = RETRY_DELAYS
    job_timeout: float = JOB_TIMEOUT  # the job's own limit; arq's is a grace period longer
    budget_reads: BudgetReads = field(default_factory=BudgetReads)
    owns_traffic: bool = True  # False: the process's workers share them, closed once all have stopped

    @classmethod
    def make(cls, settings: Settings, rules: LiveRules, redis: ArqRedis, **options: Any) -> WorkerContext:
        """The context of a worker (or a command doing a worker's work) on `redis`; options override
        the defaults (tests use faster retries)."""
        shared = options.pop("traffic", None)
        return cls(settings=settings, rules=rules, redis=redis, traffic=shared or PortalTraffic(),
                   owns_traffic=shared is None, limiter=RateLimiter(redis),
                   store=JobStore.from_settings(redis, settings), **options)

    @property
    def http(self) -> aiohttp.ClientSession:
        return self.traffic.http

    async def close(self) -> None:
        if self.owns_traffic:
            await self.traffic.close()


def context_of(ctx: dict[str, Any]) -> WorkerContext:
    """The worker's context in arq's `ctx` (a job's copy or the worker's own)."""
    return cast(WorkerContext, ctx[CONTEXT])
