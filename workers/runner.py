"""How a worker takes and runs jobs: arq's Worker, used through its public methods only.

Each override below wraps arq's own method (arq 0.26 to 0.28) and adds one thing:

- `__init__` and `main`: a claim is a lease. arq marks a started job with an in-progress key that lives
  for the job timeout plus 10 s, so a job whose worker was killed waits ten minutes before another worker
  may take it. Here the key lives LEASE seconds and the worker renews it while the job runs.
- `start_jobs`: a slot freed during a poll is filled at once. arq starts at most `max_jobs` jobs a poll
  and then waits the poll delay, whatever the jobs cost; the worker also spends no claim on the jobs it
  or another worker is running (they stay queued until they end): one pipelined EXISTS leaves them out.
- `run_job`: Redis failing a job's start or end is said in one line; the job runs again once its lease
  ends (arq would raise it into the poll, which would stop the worker).
- `finish_failed_job`: a job arq gives up on past its tries has its record ended, not left `retrying`.
- `main` and `close`: a Redis outage does not end the worker: it waits (backoff, one WARNING, one INFO
  once Redis is back) and goes on; a worker stopped while Redis is away stops anyway.

The job itself (`workers/tasks.py`) records its failures and tells arq what to do through arq's own
`Retry`; it enforces its own time limit, so it can tell a timeout from a stopping worker.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from arq import Worker
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.cron import CronJob
from arq.jobs import DeserializationError, deserialize_result
from redis.exceptions import RedisError

from app.rebind.locks import LEASE  # a dead worker's job, and its lead, are free again after this
from app.store.jobs import FINAL_STATES
from app.store.outage import RedisOutage, describe
from app.store.queue import JobQueue
from workers.context import CONTEXT, context_of

log = logging.getLogger(__name__)


class LeasedWorker(Worker):
    """A worker whose claim on a running job is a lease it renews, and that outlives Redis outages."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_progress_timeout_s = LEASE
        self.outage = RedisOutage(f"worker ({self.queue_name})", log)
        self._closed = False

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's start, given as many jobs as there are free slots, again as slots free, until the
        poll's time is up (then arq's loop polls again at once)."""
        until = self.loop.time() + self.poll_delay_s
        waiting = self._new_first(await self._not_under_way(job_ids))
        while waiting and self.allow_pick_jobs:  # a stopping worker starts no more, even mid-poll
            # One turn of the loop first: a job that just ended has freed its slot in arq's count too.
            await asyncio.sleep(0)
            free = self.max_jobs - sum(not task.done() for task in self.tasks.values())
            if free > 0:
                await super().start_jobs(waiting[:free])
                waiting = waiting[free:]
            elif not await self._a_slot_frees(until):
                return

    async def _not_under_way(self, job_ids: list[bytes]) -> list[bytes]:
        """The ids no worker is running. A job stays in arq's queue while it runs, so with many jobs under
        way (a portal's flood, in every process) a poll reads mostly ids other workers hold; arq's claim
        would try each (two or three round trips apiece, every poll); one pipelined EXISTS leaves them out."""
        here = [job_id for job_id in job_ids if not self._running_here(job_id.decode())]
        if not here:
            return here
        async with self.pool.pipeline(transaction=False) as pipe:
            for job_id in here:
                pipe.exists(in_progress_key_prefix + job_id.decode())
            under_way = await pipe.execute()
        return [job_id for job_id, claimed in zip(here, under_way) if not claimed]

    def _new_first(self, job_ids: list[bytes]) -> list[bytes]:
        """A poll's claims are one at a time: jobs this process sent back to wait whose portal has room go
        first, then new ones, then those that would only wait again (workers/context.py, PortalTurns), so
        a flood's returning jobs never delay a new event."""
        if CONTEXT not in self.ctx:
            return job_ids
        context = context_of(self.ctx)
        settings = context.settings
        return context.traffic.turns.claim_order(job_ids, settings.portal_jobs, settings.worker_jobs)

    def _running_here(self, job_id: str) -> bool:
        task = self.tasks.get(job_id)
        return task is not None and not task.done()

    async def _a_slot_frees(self, until: float) -> bool:
        running = [task for task in self.tasks.values() if not task.done()]
        left = until - self.loop.time()
        if not running or left <= 0:
            return False
        done, _ = await asyncio.wait(running, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        return bool(done)

    async def run_job(self, job_id: str, score: int) -> None:
        try:
            await super().run_job(job_id, score)
        except (RedisError, OSError) as exc:  # said when it happened (the poll fails too), not raised into it
            log.info("job %s: Redis failed its start or end (%s); it runs again once its lease ends", job_id,
                     describe(exc))

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        lost = not await self.pool.exists(job_key_prefix + job_id)  # arq had the id queued, not the job
        await self._end_record_past_its_tries(job_id, result_data)
        await super().finish_failed_job(job_id, result_data)
        if lost:
            await self._queue_again_from_record(job_id)

    async def _queue_again_from_record(self, job_id: str) -> None:
        """arq found the job id in its queue but not the job (a Redis that restarted without its data got
        the id back from a run that ended with Retry): a job whose record still waits to run is queued
        again from its record at once, rather than when the minute's rescue finds it stranded."""
        if CONTEXT not in self.ctx:
            return
        store = context_of(self.ctx).store
        record = await store.get(job_id)
        if record is not None and await JobQueue(self.pool, store).queue_again(record, "arq had lost its job"):
            log.warning("job %s: arq had lost it (Redis lost its data?); queued again from its record", job_id)

    async def _end_record_past_its_tries(self, job_id: str, result_data: bytes | None) -> None:
        """arq deletes a job past its tries: its record must not say `retrying` for ever."""
        if result_data is None or CONTEXT not in self.ctx:
            return
        try:
            result = deserialize_result(result_data, deserializer=self.job_deserializer)
        except DeserializationError:
            return
        function = self.functions.get(result.function)
        if function is None or isinstance(function, CronJob):
            return
        max_tries = self.max_tries if function.max_tries is None else function.max_tries
        store = context_of(self.ctx).store
        record = await store.get(job_id)
        if result.job_try <= max_tries or record is None or record.state in FINAL_STATES:
            return
        record.give_up(f"gave up after {max_tries} tries", {
            "code": "TOO_MANY_TRIES", "description": f"the job was started {max_tries} times without ending",
            "what_to_do": "its attempts say why it kept running again; retry it once that is fixed"})
        await store.save(record)

    async def main(self) -> None:
        leases = asyncio.create_task(self._renew_leases())
        try:
            while True:
                await self._until_redis_answers()
                try:
                    await super().main()  # polls until the worker stops (or, in burst mode, the queue is empty)
                    return
                except (RedisError, OSError) as exc:
                    # arq's loop ends at a failed poll: start it again once Redis answers. Running jobs
                    # carry on; what they cannot save, they save on their next run.
                    self.outage.down(exc)
                    await self.outage.wait()
        finally:
            leases.cancel()

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

    async def close(self) -> None:
        """arq's close, which stops at its first failed command when Redis is away: the rest (the job
        resources, the connections) is closed anyway; the health key arq would delete expires by itself."""
        if self._closed:
            return
        self._closed = True
        try:
            await super().close()
        except (RedisError, OSError) as exc:
            log.warning("stopped without Redis (%s): the worker's health key expires by itself", describe(exc))
            if self.on_shutdown:
                await self.on_shutdown(self.ctx)
            await self.pool.aclose(close_connection_pool=True)

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
