"""The bookkeeping of backfill runs: a run's key and its jobs' ids, and which runs are under way.

The CLI queues a run (`app.cli.backfill`); the reconcile sweep asks which runs are still to finish,
so it skips their leads (`workers.reconcile`). Both read it here, below them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from redis.asyncio import Redis

from app.store.jobs import INDEX_PREFIX, JobRecord, JobState, JobStore
from app.store.namespace import prefixed
from app.store.redis_typing import awaited

RUN_MARK = "backfill:"  # a backfill job's event_ts: this, then its run's key
RUN_READS = 20  # records read at most to learn which runs are under way (one a run, usually)


@dataclass(frozen=True)
class BackfillRun:
    portal: str
    since: str  # an ISO date, compared with the leads' DATE_MODIFY
    only_rule: str | None = None
    dry_run: bool = False

    @property
    def key(self) -> str:
        what = f"{self.portal}|{self.since}|{self.only_rule or '*'}|{'dry' if self.dry_run else 'apply'}"
        return prefixed("b24:backfill:" + hashlib.sha256(what.encode()).hexdigest()[:16])

    def job_for(self, lead_id: int) -> JobRecord:
        record = JobRecord.for_event(self.portal, "ONCRMLEADUPDATE", lead_id, RUN_MARK + self.key)
        return record.model_copy(update={"trigger": "backfill", "only_rule": self.only_rule,
                                         "dry_run": self.dry_run})


def job_id_in_run(portal: str, run_mark: str, lead_id: int) -> str:
    """The id of a lead's job in the run whose jobs carry `run_mark` as their event_ts."""
    return JobRecord.for_event(portal, "ONCRMLEADUPDATE", lead_id, run_mark).id


async def runs_under_way(redis: Redis, store: JobStore, portal: str, since: float) -> list[str]:
    """The portal's backfill runs with a job still to run, or one received since `since`: the event_ts
    each run's jobs share. Found through the job store's indexes (the states still to run, backfill
    jobs by time received) and one record read a run, whose list of job ids covers the others."""
    trigger = prefixed(f"{INDEX_PREFIX}trigger:backfill")
    async with redis.pipeline(transaction=False) as pipe:
        for state in (JobState.QUEUED, JobState.RUNNING, JobState.RETRYING):
            pipe.zrange(prefixed(f"{INDEX_PREFIX}state:{state.value}"), 0, -1)
        pipe.zrangebyscore(trigger, since, "+inf")
        *still_to_run, recent = await pipe.execute()
    waiting = [job_id for ids in still_to_run for job_id in ids]
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in waiting:
            pipe.zscore(trigger, job_id)
        backfill = [job_id for job_id, score in zip(waiting, await pipe.execute()) if score is not None]
    candidates = dict.fromkeys([*backfill, *recent])
    runs: list[str] = []
    for _ in range(RUN_READS):  # a run whose list of ids is gone costs a read a job: bounded
        if not candidates:
            break
        job_id = next(iter(candidates))
        del candidates[job_id]
        record = await store.get(job_id.decode())
        if record is None or not record.event_ts.startswith(RUN_MARK):
            continue
        for other in await awaited(redis.lrange(record.event_ts.removeprefix(RUN_MARK) + ":jobs", 0, -1)):
            candidates.pop(other, None)
        if record.portal == portal and record.event_ts not in runs:
            runs.append(record.event_ts)
    return runs
