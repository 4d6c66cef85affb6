"""kill -9 in the middle of a job: the job runs again within seconds and the activities end right."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from arq.connections import ArqRedis

from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
from app.rebind.locks import LEASE
from app.store.jobs import JobState, JobStore
from tests.conftest import post_event
from tests.support.chaos import assert_moved_once_to
from tests.support.processes import WorkerProcess, write_rules
from tests.support.waiting import until

pytestmark = pytest.mark.slow  # real processes: left out of the fast loop (`-m "not slow"`)


async def test_a_worker_killed_mid_job_has_its_job_run_again_within_seconds(
    client: Any, redis: ArqRedis, redis_url: str, portal: FakePortal, tmp_path: Path
) -> None:
    lead = portal.add_lead()
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(300)]
    made = portal.convert_lead(lead)
    # Slow enough that the job is caught between its binds and its unbinds.
    rules = write_rules(tmp_path / "rules.yaml", portal, per_second=4, burst=4)
    first = WorkerProcess(redis_url, rules, tmp_path, "first").start()
    second = WorkerProcess(redis_url, rules, tmp_path, "second")
    store = JobStore(redis, 3600)
    try:
        _, answer = await post_event(client, "ONCRMLEADUPDATE", lead)
        await until(
            lambda: any(len(portal.binding_history[a]) > 2 for a in activities), 60, "the first unbind"
        )
        first.kill(signal.SIGKILL)
        killed_at = time.monotonic()
        half_done = sum(len(portal.binding_history[a]) > 2 for a in activities)  # made, copied, unbound
        assert 0 < half_done and any(
            portal.bindings(a) != [(CONTACT, made["contact"]), (COMPANY, made["company"])] for a in activities
        ), "the job was not caught mid-way"

        second.start()
        deadline = time.monotonic() + 120
        while (record := await store.get(answer["job_id"])) is None or record.state != JobState.SUCCEEDED:
            assert time.monotonic() < deadline, (record, second.log.read_text()[-3000:])
            await asyncio.sleep(0.2)
        restarted_after = record.attempts[-1].started_at - (time.time() - (time.monotonic() - killed_at))
    finally:
        first.kill()
        second.stop()

    assert restarted_after < LEASE + 10, restarted_after
    assert [a.outcome for a in record.attempts][-1] == "succeeded"
    assert_moved_once_to(portal, activities, made)


async def test_sigterm_lets_the_job_in_hand_finish_then_the_worker_leaves(
    client: Any, redis: ArqRedis, redis_url: str, portal: FakePortal, tmp_path: Path
) -> None:
    lead = portal.add_lead()
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(100)]
    made = portal.convert_lead(lead)
    worker = WorkerProcess(
        redis_url, write_rules(tmp_path / "rules.yaml", portal, per_second=4, burst=4), tmp_path
    ).start()
    try:
        _, answer = await post_event(client, "ONCRMLEADUPDATE", lead)
        await until(
            lambda: any(len(portal.binding_history[a]) > 2 for a in activities), 60, "the first unbind"
        )
        # The fake portal answers from this event loop: wait for the process in a thread.
        await asyncio.to_thread(worker.kill, signal.SIGTERM)
    finally:
        worker.kill()

    assert worker.process is not None and worker.process.returncode == 0
    record = await JobStore(redis, 3600).get(answer["job_id"])
    assert record is not None and record.state == JobState.SUCCEEDED, record
    assert all(
        portal.bindings(a) == [(CONTACT, made["contact"]), (COMPANY, made["company"])] for a in activities
    )
