"""After a Redis failover a job can be left still to run with only arq's "expired" result behind it.

Seen in tests/support/failover.py at 200 events/s: the new primary kept a job's queue entry but not its
arq job, arq then said `job expired` and wrote its result, and the record still said queued. arq
queues no job id that has a result, so whoever queues it again must clear that first, or the job never runs.
"""
from __future__ import annotations

import time
from typing import Any

import pytest
from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from arq.worker import FailedJobs

from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
from app.store.jobs import JobState, JobStore
from app.store.queue import STRANDED_AFTER, JobQueue
from tests.conftest import post_event


async def test_a_job_arq_called_expired_is_rescued_and_runs(
        client: Any, portal: FakePortal, redis: ArqRedis, make_worker: Any) -> None:
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    job_id = answer["job_id"]
    await redis.delete(job_key_prefix + job_id)  # the failover's doing: the queue entry without its job
    with pytest.raises(FailedJobs):  # arq says "job expired" and keeps a result for the id
        await make_worker().run_check()
    store = JobStore(redis, 3600)

    # The worker that found the id without its job queued it again from its record at once (clearing
    # arq's result, which blocks a job id) and ran it; the minute's rescue has nothing left to do.
    assert (await store.get(job_id)).state == JobState.SUCCEEDED  # type: ignore[union-attr]
    assert portal.bindings(activity) == [(CONTACT, made["contact"]), (COMPANY, made["company"])]
    assert await JobQueue(redis, store).requeue_stranded(now=time.time() + STRANDED_AFTER + 1) == []


async def test_a_spooled_event_whose_first_try_died_with_the_old_primary_is_accepted_on_the_new_one(
        client: Any, portal: FakePortal, redis: ArqRedis, make_worker: Any) -> None:
    """Seen in tests/chaos/test_failover.py: the event's job was written on the old primary, a worker took
    it, the replica never got it and the web process spooled the event (its WAIT failed). On the new
    primary the worker's bookkeeping left the id queued, arq called it expired and kept a result; the
    spool's drain then found that result and took the delivery for one seen before: the job was lost."""
    from app.store.jobs import JOB_KEY
    from app.store.namespace import prefixed

    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    job_id = answer["job_id"]
    store = JobStore(redis, 3600)
    spooled = await store.get(job_id)
    assert spooled is not None
    await redis.delete(job_key_prefix + job_id, prefixed(JOB_KEY + job_id))  # never reached the replica
    with pytest.raises(FailedJobs):
        await make_worker().run_check()  # "job expired": arq keeps a result for the id

    assert await JobQueue(redis, store).submit(spooled)  # the spool's drain: accepted, not "seen before"
    await make_worker().run_check()

    assert (await store.get(job_id)).state == JobState.SUCCEEDED  # type: ignore[union-attr]
    assert portal.bindings(activity) == [(CONTACT, made["contact"]), (COMPANY, made["company"])]
