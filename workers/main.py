"""The arq worker: its shared context made once at startup, the job function, and its policies."""
from __future__ import annotations

import logging
from functools import partial
from typing import Any

from arq import cron, func
from arq.cron import CronJob
from arq.worker import Function
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from app.live_rules import LiveRules
from app.rules.model import RuleSet
from app.settings import Settings
from app.store.amnesia import AFTER_FORGETTING, AFTER_FORGETTING_KEPT
from app.store.namespace import prefixed
from app.store.queue import (
    LIVE_QUEUE,
    PROCESS_EVENT,
    is_live_queue,
    RESCUE_CRON,
    SWEEP_CRON,
    JobQueue,
    deserialize,
    serialize,
)
from workers.context import CONTEXT, JOB_TIMEOUT, PortalTraffic, WorkerContext, context_of
from workers.reconcile import TICK, reconcile_after_forgetting, reconcile_job
from workers.runner import LeasedWorker
from workers.tasks import process_event

log = logging.getLogger(__name__)

# Tries are counted on the job record (workers/tasks.py): arq counts every run, the runs that only
# waited for their portal's turn, a lead's lock or a time budget too. This only stops a job that keeps
# waiting for days; arq's retry key is never written.
MAX_TRIES = 100_000
POLL_DELAY = 0.1  # seconds between reads of the queue
# arq's time limit for a job: the job stops itself at its own (WorkerContext.job_timeout) and saves its
# record; arq's, a grace period later, only catches a job that could not.
JOB_GRACE = 60
# Backfill jobs a process runs at once, of every portal; each portal's are capped at Settings.portal_jobs
# (their reads and writes pack into shared batches, which leave fuller the more jobs wait for them:
# issue 16's backfill, 144 requests with 20, 114-120 with 100).
BACKFILL_JOBS = 300


async def startup(ctx: dict[str, Any], settings: Settings, rules: LiveRules, options: dict[str, Any]) -> None:
    """arq's on_startup: the worker's context, once (arq calls it again when the worker goes on after a
    Redis outage)."""
    if CONTEXT not in ctx:
        ctx[CONTEXT] = WorkerContext.make(settings, rules, ctx["redis"], **options)


async def shutdown(ctx: dict[str, Any]) -> None:
    if CONTEXT in ctx:  # not there when the worker stops before it started (waiting for Redis, say)
        await context_of(ctx).close()


def shared_portal_traffic() -> dict[str, Any]:
    """WorkerContext options for a process's workers (live and backfill): one HTTP session and one
    PortalBatcher per portal between them, so that one sender sees all of the process's work for a portal."""
    return {"traffic": PortalTraffic()}


async def close_portal_traffic(shared: dict[str, Any]) -> None:
    """Closes what `shared_portal_traffic` made, once the workers sharing it have stopped."""
    await shared["traffic"].close()


async def requeue_stranded(ctx: dict[str, Any]) -> int:
    """The minute's look for jobs whose records wait to run but that have left the queue."""
    context = context_of(ctx)
    try:
        rescued = await JobQueue(context.redis, context.store).requeue_stranded()
    except RedisError as exc:  # the worker says once that Redis is away; the next minute looks again
        log.info("the look for stranded jobs was skipped: Redis is unreachable (%s)", type(exc).__name__)
        return 0
    if rescued:
        log.warning("queued again %d jobs that had left the queue without ending (%s)", len(rescued),
                    ", ".join(rescued[:5]) + (", ..." if len(rescued) > 5 else ""))
    return len(rescued)


def cron_leftovers(*crons: CronJob) -> list[Function]:
    """The crons' functions as plain ones, for every worker (arq's own crons replace them where it has them).

    arq queues a cron's job on the worker's own queue up to two polls before it is due; a worker that
    stops meanwhile leaves it there, for whichever worker reads the queue next: a burst worker working
    a queue off, or one whose sweeps are off (B24_RECONCILE_INTERVAL=0). Without the function arq fails
    the job ("function 'cron:reconcile_job' not found"). Each function is harmless anywhere: the sweep
    keeps to its interval (and to its gate in Redis), the look for stranded jobs may run any time.
    """
    return [func(cron.coroutine, name=cron.name, timeout=cron.timeout_s, max_tries=1, keep_result=cron.keep_result_s)
            for cron in crons]


def build_worker(settings: Settings, rules: RuleSet | LiveRules, redis: ArqRedis, **options: Any) -> LeasedWorker:
    """A worker for the event queue; tests pass `burst=True`, and in `ctx` WorkerContext options."""
    live = rules if isinstance(rules, LiveRules) else LiveRules(rules)
    context_options = options.pop("ctx", {})
    # Long-running live workers sweep for missed events; a gate in Redis keeps it to one sweep an interval.
    queue = options.pop("queue_name", LIVE_QUEUE)
    # Every shard's live worker has the crons; arq's cron job ids (`<name>:<time>`) are one a run time
    # across queues, so one shard's worker runs each.
    sweeps = settings.reconcile_interval and not options.get("burst") and is_live_queue(queue)
    # arq makes a cron's job ids from its name (`<name>:<time>`): prefixed, each installation sharing a
    # Redis runs its own sweep. Unprefixed it is arq's default name.
    sweep_cron = cron(reconcile_job, name=prefixed(SWEEP_CRON), second=set(range(0, 60, TICK)),
                      timeout=JOB_TIMEOUT, max_tries=1)
    # One worker a minute (arq's cron job ids are unique per run time) looks for stranded jobs.
    rescue_cron = cron(requeue_stranded, name=prefixed(RESCUE_CRON), second=0, timeout=60, max_tries=1)
    long_running = not options.get("burst") and is_live_queue(queue)
    crons = [*([sweep_cron] if sweeps else []), *([rescue_cron] if long_running else [])]
    return LeasedWorker(
        # The job record is the job's result: arq keeps none for event jobs.
        functions=[func(process_event, name=PROCESS_EVENT, max_tries=MAX_TRIES, timeout=JOB_TIMEOUT + JOB_GRACE,
                        keep_result=0),
                   # Queued by whichever process finds that Redis forgot; its kept result stops a second one.
                   func(reconcile_after_forgetting, name=AFTER_FORGETTING, timeout=JOB_TIMEOUT, max_tries=3,
                        keep_result=AFTER_FORGETTING_KEPT),
                   *cron_leftovers(sweep_cron, rescue_cron)],
        cron_jobs=crons or None, queue_name=prefixed(queue), redis_pool=redis,
        on_startup=partial(startup, settings=settings, rules=live, options=context_options), on_shutdown=shutdown,
        job_serializer=serialize, job_deserializer=deserialize, keep_result=3600,
        # arq polls every 0.5 s by default: an event would wait up to that long for an idle worker, and a
        # busy one reads at most 100 queued ids a poll. Polling costs an idle worker one Redis round trip.
        **{"max_jobs": settings.worker_jobs, "poll_delay": POLL_DELAY, **options},
    )
