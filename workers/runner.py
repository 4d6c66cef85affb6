"""How a worker takes, runs and closes an event job: arq's Worker, with its per-job bookkeeping in fewer
round trips and a lease on every claim.

arq spends four Redis round trips on each job besides the job's own work: the claim (WATCH, EXISTS,
ZSCORE, MULTI/EXEC), a transaction reading the job and counting the try, and another deleting it once it
ends, which also stores a result nobody here reads (the job record is the result). A worker runs
hundreds of short jobs a second, and one round trip costs it about 0.15 ms of CPU. So here:

- the claim is one script, which also counts the try and returns the job and our record of it;
- an event job closes itself: the last pipeline it sends anyway (record, audit, metrics) also takes it
  off the queue (`JobClosing`), and nothing is left to do when it returns.

A job put back (arq's `Retry`) or cancelled by a stopping worker is handled as arq does; one whose end
could not be saved (Redis failed it) goes back in the queue rather than being dropped as arq would.
Cron jobs (the reconcile sweep) run arq's own `run_job` entirely.

A Redis outage does not end the worker: a poll that fails waits (backoff, one WARNING, one INFO once
Redis is back) and polls again; a worker started or stopped while Redis is away waits, or stops anyway.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from arq import Retry, Worker
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.cron import CronJob
from arq.jobs import SerializationError, deserialize_job_raw
from arq.utils import ms_to_datetime, timestamp_ms
from arq.worker import Function, RetryJob
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from app.rebind.locks import LEASE  # a dead worker's job, and its lead, are free again after this
from app.store.jobs import JOB_KEY, JobRecord, JobStore
from app.store.namespace import prefixed
from app.store.outage import RedisOutage, describe

log = logging.getLogger(__name__)

RETRY_COUNT_TTL = 88400  # seconds, as arq keeps its own count of tries
TIMED_OUT = "the job ran past its time limit"  # what a job cancelled for its time limit is told
AFTER_A_CRASH = 5000  # ms before a job that could not save its end runs again (and finds its work done)

# The claim on a queued job, in one round trip: free (no in-progress key), still queued and due, then
# marked in progress for a lease. Returns nil, or the job's score; for an event job (ARGV[4] = 1) also
# its try (counted here, as arq counts it when a job starts), the job itself and our record of it.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return false end
redis.call('PSETEX', KEYS[1], ARGV[3], '1')
if ARGV[4] ~= '1' then return {score} end
local try = redis.call('INCR', KEYS[4])
redis.call('EXPIRE', KEYS[4], ARGV[5])
return {score, try, redis.call('GET', KEYS[5]), redis.call('GET', KEYS[3])}
"""

# What arq's finish_job deletes for a job that has ended (its in-progress mark, try count, data, abort
# request and queue entry), without the result it would store: one command instead of three.
_CLOSE = """
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
return redis.call('ZREM', KEYS[5], ARGV[1])
"""

# A job ready to run: its function, arguments, keyword arguments and ctx.
_Start = tuple[Function | CronJob, tuple[Any, ...], dict[str, Any], dict[str, Any]]


@dataclass
class _Claim:
    job_try: int
    job: bytes | None  # None: the job's data expired while it waited
    record: bytes | None


async def _until_done(task: asyncio.Task[Any], timeout: float | None) -> Any:
    """The job's result. Past its time limit the job is cancelled with TIMED_OUT, so it can tell a
    timeout from a stopping worker: it records the timeout and goes back in the queue, to continue
    where it stopped (what it changed stays changed)."""
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:  # the worker is stopping: the job stops too, and saves its record first
        task.cancel()
        await asyncio.wait({task})
        raise
    if not done:
        task.cancel(TIMED_OUT)
    return await task


class JobClosing:
    """What takes a finished job off arq's queue, staged by the job in its own last pipeline."""

    def __init__(self, queue_name: str, job_id: str) -> None:
        self._queue_name = queue_name
        self._job_id = job_id
        self.staged = False

    def stage(self, pipe: Pipeline) -> None:
        job_id = self._job_id
        pipe.eval(_CLOSE, 5, in_progress_key_prefix + job_id, retry_key_prefix + job_id, job_key_prefix + job_id,
                  abort_jobs_ss, self._queue_name, job_id)
        self.staged = True


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
        self._cron_ids = tuple(f"{cron.name}:" for cron in self.cron_jobs)
        self._claims: dict[str, _Claim] = {}
        self.outage = RedisOutage(f"worker ({self.queue_name})", log)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's `Worker.start_jobs` (arq 0.26 to 0.28), with the claim in one atomic script, and a slot
        waited for while this poll lasts.

        arq returns as soon as every slot is taken and polls again only `poll_delay` later (0.5 s): a
        busy worker ran at most `max_jobs` jobs per poll, 20 a second, whatever the jobs cost. Here the
        next job starts as soon as a slot frees, until the poll's time is up (then arq's loop beats and
        polls again at once).
        """
        until = self.loop.time() + self.poll_delay_s
        for job_id_b in job_ids:
            job_id = job_id_b.decode()
            if self._running_here(job_id):  # still queued until it ends: claiming it is a wasted round trip
                continue
            await self.sem.acquire()
            # A stopping worker picks no more jobs, even in the middle of a poll.
            if not await self._slot_free(until) or not self.allow_pick_jobs:
                self.sem.release()
                return
            self.job_counter += 1
            claimed = await self._claim(job_id)
            if claimed is None:  # running elsewhere, done, or put back with a delay by another worker
                self.job_counter -= 1
                self.sem.release()
                continue
            task = self.loop.create_task(self.run_job(job_id, int(float(claimed[0]))))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    def _running_here(self, job_id: str) -> bool:
        task = self.tasks.get(job_id)
        return task is not None and not task.done()

    async def _slot_free(self, until: float) -> bool:
        """Whether a job may start now, having waited until `until` at most for a running one to end."""
        while self.job_counter >= self.max_jobs:
            running = [task for task in self.tasks.values() if not task.done()]
            if not running or self.loop.time() >= until:
                return False
            await asyncio.wait(running, timeout=until - self.loop.time(), return_when=asyncio.FIRST_COMPLETED)
        return True

    async def _claim(self, job_id: str) -> list[Any] | None:
        event_job = not job_id.startswith(self._cron_ids)
        claimed = await self.pool.eval(
            _CLAIM, 5, in_progress_key_prefix + job_id, self.queue_name, prefixed(JOB_KEY + job_id),
            retry_key_prefix + job_id, job_key_prefix + job_id,
            job_id, timestamp_ms(), int(self.in_progress_timeout_s * 1000), int(event_job), RETRY_COUNT_TTL)
        if claimed is not None and event_job:
            self._claims[job_id] = _Claim(int(claimed[1]), claimed[2], claimed[3])
        return claimed  # type: ignore[no-any-return]

    async def run_job(self, job_id: str, score: int) -> None:
        try:
            await self._run_job(job_id, score)
        except RedisError as exc:  # said when it happened (the poll fails too): not raised again later by the poll
            log.info("job %s: its end could not be saved (%s); it runs again once its lease ends", job_id,
                     describe(exc))

    async def _run_job(self, job_id: str, score: int) -> None:
        claim = self._claims.pop(job_id, None)
        if claim is None:  # a cron job: arq's own way
            await super().run_job(job_id, score)
            return
        start = await self._start(job_id, score, claim)
        if start is None:
            return
        function, args, kwargs, ctx = start
        closing = ctx["closing"] = JobClosing(self.queue_name, job_id)
        self.job_tasks[job_id] = task = self.loop.create_task(function.coroutine(ctx, *args, **kwargs))
        timeout = self.job_timeout_s if function.timeout_s is None else function.timeout_s
        try:
            await _until_done(task, timeout)
        except Retry as exc:  # the job put itself back for later; its record says why
            self.jobs_retried += 1
            log.info("job %s will run again in %.2f s", job_id, (exc.defer_score or 0) / 1000)
            delay = exc.defer_score and exc.defer_score + (timestamp_ms() - score)
            await asyncio.shield(self.finish_job(job_id, False, None, None, False, delay, None))
        except (asyncio.CancelledError, RetryJob):  # the worker is stopping: the job stays queued
            self.jobs_retried += 1
            log.info("job %s cancelled, will be run again", job_id)
            await asyncio.shield(self.finish_job(job_id, False, None, None, False, None, None))
        except RedisError as exc:  # the job records its own failures: this is Redis failing its last save
            self.jobs_retried += 1
            log.info("job %s could not save its end (%s); it will run again", job_id, describe(exc))
            delay = AFTER_A_CRASH + (timestamp_ms() - score)
            await asyncio.shield(self.finish_job(job_id, False, None, None, False, delay, None))
        except Exception:
            self.jobs_retried += 1
            log.exception("job %s could not finish; it will run again in %d s", job_id, AFTER_A_CRASH // 1000)
            delay = AFTER_A_CRASH + (timestamp_ms() - score)
            await asyncio.shield(self.finish_job(job_id, False, None, None, False, delay, None))
        else:
            self.jobs_complete += 1
            if not closing.staged:
                await asyncio.shield(self.finish_job(job_id, True, None, None, False, None, None))
        finally:
            del self.job_tasks[job_id]

    async def _start(self, job_id: str, score: int, claim: _Claim) -> _Start | None:
        """The job's function, arguments and ctx (as arq makes it); None once a job that cannot run is
        taken off the queue, as arq does."""
        if claim.job is None:
            log.warning("job %s expired", job_id)
            return await self._give_up(job_id)
        try:
            name, args, kwargs, enqueued_try, enqueued_ms = deserialize_job_raw(
                claim.job, deserializer=self.job_deserializer)
        except SerializationError:
            log.exception("job %s could not be read", job_id)
            return await self._give_up(job_id)
        function = self.functions.get(name)
        if function is None:
            log.warning("job %s, function %r not found", job_id, name)
            return await self._give_up(job_id)
        job_try = max(claim.job_try, enqueued_try or 0)
        max_tries = self.max_tries if function.max_tries is None else function.max_tries
        if job_try > max_tries:
            log.warning("job %s: max %d tries exceeded", job_id, max_tries)
            await self._record_given_up(claim, max_tries)
            return await self._give_up(job_id)
        ctx = {**self.ctx, "job_id": job_id, "job_try": job_try, "enqueue_time": ms_to_datetime(enqueued_ms),
               "score": score, "claimed_record": claim.record}
        return function, args, kwargs, ctx

    async def _record_given_up(self, claim: _Claim, max_tries: int) -> None:
        """arq deletes a job past its tries: its record must not stay `retrying` for ever."""
        if claim.record is None:
            return
        record = JobRecord.model_validate_json(claim.record)
        record.give_up(f"gave up after {max_tries} tries", {
            "code": "TOO_MANY_TRIES", "description": f"the job was started {max_tries} times without ending",
            "what_to_do": "its attempts say why it kept running again; retry it once that is fixed"})
        store = self.ctx.get("store") or JobStore.from_settings(self.pool, self.ctx["settings"])
        await store.save(record)

    async def _give_up(self, job_id: str) -> None:
        self.jobs_failed += 1
        await asyncio.shield(self.finish_failed_job(job_id, None))

    async def main(self) -> None:
        await self._until_redis_answers()
        heartbeat = asyncio.create_task(self._renew_leases())
        try:
            await super().main()
        finally:
            heartbeat.cancel()

    async def _until_redis_answers(self) -> None:
        """A worker started while Redis is away waits for it (arq would fail on its first command)."""
        while True:
            try:
                await self.pool.ping()
            except (RedisError, OSError) as exc:
                self.outage.down(exc)
                await self.outage.wait()
            else:
                self.outage.up()
                return

    async def _poll_iteration(self) -> None:
        """arq's poll, which raises when Redis is away (and arq's loop ends): here the worker waits and
        polls again. Running jobs carry on; what they cannot save, they save on their next run."""
        try:
            await super()._poll_iteration()
        except (RedisError, OSError) as exc:
            self.outage.down(exc)
            await self.outage.wait()
        else:
            self.outage.up()

    async def close(self) -> None:
        """arq's close, which stops at its first failed command when Redis is away: the rest (the job
        resources, the connections) is closed anyway; the health key arq would delete expires by itself."""
        try:
            await super().close()
        except (RedisError, OSError) as exc:
            log.warning("stopped without Redis (%s): the worker's health key expires by itself", describe(exc))
            if self.on_shutdown:
                await self.on_shutdown(self.ctx)
            await self.pool.aclose(close_connection_pool=True)
            self._pool = None

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(LEASE / 3)
            running = [job_id for job_id in self.tasks if self._running_here(job_id)]
            if not running:
                continue
            try:
                async with self.pool.pipeline(transaction=False) as pipe:
                    for job_id in running:
                        pipe.pexpire(in_progress_key_prefix + job_id, int(LEASE * 1000))  # no-op once ended
                    await pipe.execute()
            except (RedisError, OSError) as exc:  # Redis is away (the poll says so once); the next beat tries again
                log.debug("could not renew the leases of %d jobs: %s", len(running), type(exc).__name__)
