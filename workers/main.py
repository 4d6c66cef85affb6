"""The arq worker: resources made once at startup, the job function, and its policies."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from arq import Worker, cron, func
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from redis.exceptions import RedisError

from app.bitrix.budget import BudgetReads
from app.bitrix.client import RetryPolicy
from app.bitrix.ratelimit import RateLimiter
from app.config import LiveRules
from app.jobs import JOB_KEY, JobStore
from app.namespace import prefixed
from app.queue import LIVE_QUEUE, PROCESS_EVENT, deserialize, serialize
from app.rules.model import RuleSet
from app.settings import Settings
from workers.locks import LEASE  # a dead worker's job, and its lead, are free again after this
from workers.reconcile import TICK, reconcile_job
from workers.tasks import JOB_TIMEOUT, RETRY_DELAYS, process_event

log = logging.getLogger(__name__)

# Retries are counted on the job record (waiting for a lock or a time budget is free); this only
# stops a job that keeps waiting for hours.
MAX_TRIES = 200


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    # Tests and the combined `run` may hand in their own; a second startup reuses the first's.
    if "http" not in ctx:
        # A portal's REST API sets no cookies worth keeping; the default jar would filter every request.
        ctx["http"] = aiohttp.ClientSession(headers={"User-Agent": "b24rebind/0.1"},
                                            cookie_jar=aiohttp.DummyCookieJar())
    if "store" not in ctx:
        ctx["limiter"] = RateLimiter(ctx["redis"])
        ctx["store"] = JobStore.from_settings(ctx["redis"], settings)
    ctx.setdefault("retry_policy", RetryPolicy())
    # arq hands each job a copy of ctx: what jobs share must be made here, not on first use.
    ctx.setdefault("budget_reads", BudgetReads())
    ctx.setdefault("shared_batches", {})  # (portal, low priority) -> SharedBatches
    ctx.setdefault("claimed_records", {})  # job id -> its record, read when the job was claimed
    ctx.setdefault("retry_delays", RETRY_DELAYS)


async def shutdown(ctx: dict[str, Any]) -> None:
    await ctx["http"].close()


# arq's claim on a queued job, in one round trip instead of four (WATCH, EXISTS, ZSCORE, MULTI/EXEC):
# free (no in-progress key), still queued and due, then marked in progress. Returns its score and our
# record of it (so the job need not read it again), or nil.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return false end
redis.call('PSETEX', KEYS[1], ARGV[3], '1')
return {score, redis.call('GET', KEYS[3])}
"""


class LeasedWorker(Worker):
    """A worker whose claim on a running job is a lease it renews, so a killed worker's job runs again soon.

    arq marks a started job with an in-progress key that lives for the job timeout plus 10 s; a worker
    killed with SIGKILL leaves that key, and the job waits the whole timeout (ten minutes) before another
    worker may take it. Here the key lives LEASE seconds and the worker renews it while the job runs:
    a live job keeps its claim up to the job timeout, a dead worker's job is free again within LEASE.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_progress_timeout_s = LEASE

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's `Worker.start_jobs` (arq 0.26 to 0.28), with the claim in one atomic script.

        A worker runs hundreds of short jobs a second, and arq's claim took a quarter of its time.
        """
        for job_id_b in job_ids:
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                return
            self.job_counter += 1
            job_id = job_id_b.decode()
            claimed = await self.pool.eval(_CLAIM, 3, in_progress_key_prefix + job_id, self.queue_name,
                                           prefixed(JOB_KEY + job_id), job_id, timestamp_ms(),
                                           int(self.in_progress_timeout_s * 1000))
            if claimed is None:  # running elsewhere, done, or put back with a delay by another worker
                self.job_counter -= 1
                self.sem.release()
                continue
            score, record = claimed
            if record is not None:  # the job's record, read in the same round trip: the job starts with it
                self.ctx["claimed_records"][job_id] = record
            task = self.loop.create_task(self.run_job(job_id, int(float(score))))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            task.add_done_callback(lambda _, claimed=job_id: self.ctx["claimed_records"].pop(claimed, None))
            self.tasks[job_id] = task

    async def main(self) -> None:
        heartbeat = asyncio.create_task(self._renew_leases())
        try:
            await super().main()
        finally:
            heartbeat.cancel()

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(LEASE / 3)
            running = [job_id for job_id, task in self.tasks.items() if not task.done()]
            if not running:
                continue
            try:
                async with self.pool.pipeline(transaction=False) as pipe:
                    for job_id in running:
                        pipe.pexpire(in_progress_key_prefix + job_id, int(LEASE * 1000))  # no-op once ended
                    await pipe.execute()
            except (RedisError, OSError) as exc:  # Redis is away; the next beat tries again
                log.warning("could not renew the leases of %d jobs: %s", len(running), type(exc).__name__)


def build_worker(settings: Settings, rules: RuleSet | LiveRules, redis: ArqRedis, **options: Any) -> Worker:
    """A worker for the event queue; tests pass `burst=True` and their own ctx entries."""
    live = rules if isinstance(rules, LiveRules) else LiveRules(rules)
    ctx = {"settings": settings, "rules": live, **options.pop("ctx", {})}
    # Long-running live workers sweep for missed events; a gate in Redis keeps it to one sweep an interval.
    queue = options.pop("queue_name", LIVE_QUEUE)
    sweeps = settings.reconcile_interval and not options.get("burst") and queue == LIVE_QUEUE
    # arq makes a cron's job ids from its name (`<name>:<time>`): prefixed, each installation sharing a
    # Redis runs its own sweep. Unprefixed it is arq's default name.
    sweep_cron = cron(reconcile_job, name=prefixed("cron:reconcile_job"), second=set(range(0, 60, TICK)),
                      timeout=JOB_TIMEOUT, max_tries=1)
    return LeasedWorker(
        functions=[func(process_event, name=PROCESS_EVENT, max_tries=MAX_TRIES, timeout=JOB_TIMEOUT)],
        cron_jobs=[sweep_cron] if sweeps else None, queue_name=prefixed(queue),
        redis_pool=redis, ctx=ctx, on_startup=startup, on_shutdown=shutdown,
        job_serializer=serialize, job_deserializer=deserialize, keep_result=3600, **{"max_jobs": 10, **options},
    )
