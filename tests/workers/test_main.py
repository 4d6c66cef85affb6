"""LeasedWorker's claim on queued jobs: one atomic script, with arq's rules for what may start.

That due jobs are claimed and run, exactly once among several workers, every end-to-end test shows.
"""
from __future__ import annotations

import time
from typing import Any

import pytest
from arq.constants import in_progress_key_prefix

from app.bitrix.fake import LEAD, FakePortal
from app.jobs import JobStore
from app.queue import LIVE_QUEUE
from tests.conftest import post_event


async def queued_job(client: Any, portal: FakePortal) -> str:
    activity = portal.add_activity([(LEAD, portal.add_lead())])
    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    return str(answer["job_id"])


async def test_a_job_another_worker_holds_is_left_alone(client: Any, make_worker: Any, portal: FakePortal,
                                                       redis: Any) -> None:
    job_id = await queued_job(client, portal)
    await redis.psetex(in_progress_key_prefix + job_id, 10_000, b"1")
    worker = make_worker()

    await worker.start_jobs([job_id.encode()])

    assert job_id not in worker.tasks
    assert worker.job_counter == 0  # the slot it reserved is free again


async def test_a_job_put_back_for_later_is_not_started_early(client: Any, make_worker: Any, portal: FakePortal,
                                                            redis: Any) -> None:
    job_id = await queued_job(client, portal)
    await redis.zadd(LIVE_QUEUE, {job_id: int(time.time() * 1000) + 60_000})
    worker = make_worker()

    await worker.start_jobs([job_id.encode()])

    assert job_id not in worker.tasks
    assert await redis.exists(in_progress_key_prefix + job_id) == 0


async def test_the_record_read_with_the_claim_is_used_once_and_not_kept(client: Any, make_worker: Any,
                                                                       portal: FakePortal,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_second_read(self: JobStore, job_id: str) -> None:
        raise AssertionError("the job read its record again")

    monkeypatch.setattr(JobStore, "get", no_second_read)
    lead = portal.add_lead()
    portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    worker = make_worker()

    await worker.run_check()
    monkeypatch.undo()  # the API reads records the usual way

    job = await (await client.get(f"/api/jobs/{answer['job_id']}")).json()
    assert (job["state"], job["trigger"], len(job["attempts"])) == ("succeeded", "webhook", 1)
    assert worker.ctx["claimed_records"] == {}
