"""A portal's share of a worker process's slots: past it, a job waits in the queue for a turn of its own."""
from __future__ import annotations

import time
from typing import Any

from app.fakeportal import LEAD, FakePortal
from app.store.jobs import JobStore
from app.store.queue import LIVE_QUEUE
from tests.conftest import post_event
from tests.support.workers import run_one, started
from workers.context import PortalTurns, context_of


def test_a_portal_past_its_share_waits_and_the_other_portals_do_not() -> None:
    turns = PortalTurns()

    assert [turns.take("busy", False, 2) for _ in range(2)] == [0.0, 0.0]
    waits = [turns.take("busy", False, 2) for _ in range(3)]

    assert all(wait > 0 for wait in waits) and waits == sorted(waits)  # each its own later turn
    assert turns.take("quiet", False, 2) == 0.0
    assert turns.take("busy", True, 2) == 0.0  # its backfill counts apart


def test_a_portal_past_its_share_takes_the_slots_the_others_leave_free_but_one_share() -> None:
    turns = PortalTurns()  # 10 slots, a share of 3

    assert [turns.take("flood", False, 3, 10) for _ in range(7)] == [0.0] * 7
    assert turns.take("flood", False, 3, 10) > 0  # 3 slots left: a share, kept for the others
    assert [turns.take("quiet", False, 3, 10) for _ in range(3)] == [0.0] * 3  # its share is there
    turns.give_back("flood", False)
    assert turns.take("flood", False, 3, 10) > 0  # 9 under way: nothing left to borrow
    assert turns.take("flood", True, 3, 10) == 0.0  # backfill counts apart


def test_an_idle_portal_leaves_nothing_behind() -> None:
    turns = PortalTurns()
    turns.take("acme", False, 5)
    turns.give_back("acme", False)

    assert turns.running("acme") == 0
    assert not any(vars(turns).values())  # no entry kept for a portal with nothing under way


async def test_a_job_past_its_portals_share_goes_back_to_the_queue_untouched(
        client: Any, make_worker: Any, portal: FakePortal, redis: Any) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    _, answer = await post_event(client, "ONCRMACTIVITYADD", portal.add_activity([(LEAD, lead)]))
    job_id = str(answer["job_id"])
    worker = await started(make_worker())
    context = context_of(worker.ctx)
    settings = context.settings
    # The portal's share, and every slot it may borrow (all but a share), taken by jobs under way.
    for _ in range(settings.worker_jobs - settings.portal_jobs):
        context.traffic.turns.take("acme", False, settings.portal_jobs, settings.worker_jobs)
    before = time.time() * 1000

    await run_one(worker, job_id)

    assert worker.jobs_retried == 1
    assert await redis.zscore(LIVE_QUEUE, job_id) > before  # later, not now
    record = await JobStore(redis, 3600).get(job_id)
    assert record is not None and record.state.value == "queued" and record.attempts == []  # nothing read
    assert portal.request_count == 0
