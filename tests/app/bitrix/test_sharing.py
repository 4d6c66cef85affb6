"""SharedBatches against the fake portal: concurrent jobs' reads travel together, each gets its own."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from app.bitrix.client import Command, RestClient, RetryPolicy
from app.bitrix.errors import ConfigError
from app.bitrix.portal import PortalConfig
from app.bitrix.ratelimit import LocalRateLimiter
from app.bitrix.sharing import SharedBatches
from app.fakeportal.portal import CONTACT, LEAD, FakePortal
from app.rebind.executor import execute
from app.rules.plan import BindingPlan
from tests.app.rebind.test_executor import rebind
from tests.conftest import post_event


@pytest.fixture
async def clients(portal_config: PortalConfig) -> AsyncIterator[Any]:
    """RestClients as a worker's jobs have them: one session and limiter, one SharedBatches."""
    shared, limiter = SharedBatches(), LocalRateLimiter()
    async with aiohttp.ClientSession() as session:
        def make() -> RestClient:
            return RestClient(session, portal_config, limiter, retry=RetryPolicy(attempts=2, base=0.01),
                              shared=shared)
        yield make, shared


def bindings_of(activity: int) -> list[Command]:
    return [Command("crm.activity.binding.list", {"activityId": activity}),
            Command("crm.activity.get", {"id": activity})]


async def test_reads_of_concurrent_jobs_leave_in_one_call(clients: Any, portal: FakePortal) -> None:
    make, shared = clients
    lead = portal.add_lead()
    activities = [portal.add_activity([(LEAD, lead)], subject=f"mail {n}") for n in range(3)]

    answers = await asyncio.gather(*(make().batch(bindings_of(a)) for a in activities))

    assert portal.requests == [("batch", 6)]
    assert [answer[1].result["SUBJECT"] for answer in answers] == ["mail 0", "mail 1", "mail 2"]
    assert shared.shared_calls == 1


async def test_a_read_alone_leaves_at_once_and_the_request_counts_on_its_job(clients: Any,
                                                                            portal: FakePortal) -> None:
    make, _ = clients
    activity = portal.add_activity([(LEAD, portal.add_lead())])
    first, second = make(), make()

    await first.batch(bindings_of(activity))
    await second.batch(bindings_of(activity))

    assert portal.requests == [("batch", 2), ("batch", 2)]
    assert (first.requests, second.requests) == (1, 1)


async def test_reads_past_one_call_are_split_at_fifty_commands(clients: Any, portal: FakePortal) -> None:
    make, _ = clients
    lead = portal.add_lead()
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(30)]

    answers = await asyncio.gather(*(make().batch(bindings_of(a)) for a in activities))

    assert all(n <= 50 for _, n in portal.requests) and sum(n for _, n in portal.requests) == 60
    assert len(portal.requests) == 2
    assert [int(answer[1].result["ID"]) for answer in answers] == activities


async def test_a_failed_call_fails_every_job_that_shared_it(clients: Any, portal: FakePortal) -> None:
    make, _ = clients
    activity = portal.add_activity([(LEAD, portal.add_lead())])
    portal.fail_next(1, status=401, error="NO_AUTH_FOUND")

    outcomes = await asyncio.gather(*(make().batch(bindings_of(activity)) for _ in range(3)),
                                    return_exceptions=True)

    assert [type(o) for o in outcomes] == [ConfigError] * 3
    assert len(portal.requests) == 1


async def test_reads_and_writes_never_share_a_call(clients: Any, portal: FakePortal) -> None:
    make, _ = clients
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    bind = Command("crm.activity.binding.add", {"activityId": activity, "entityTypeId": 3,
                                                "entityId": made["contact"]})

    await asyncio.gather(make().batch(bindings_of(activity)), make().batch([bind], write=True))

    assert sorted(portal.requests) == [("batch", 1), ("batch", 2)]


async def test_a_halt_in_one_jobs_writes_leaves_the_others_to_send_theirs_again(clients: Any,
                                                                                portal: FakePortal) -> None:
    make, _ = clients
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    refused, fine = portal.add_activity([(LEAD, lead)]), portal.add_activity([(LEAD, lead)])
    hidden = portal.add_contact()
    portal.set_access_denied({(CONTACT, hidden)})  # the webhook's user may not bind to it
    refused_plan = BindingPlan(activities=(rebind(refused, lead, hidden),))
    fine_plan = BindingPlan(activities=(rebind(fine, lead, made["contact"]),))

    outcomes = await asyncio.gather(execute(refused_plan, make()), execute(fine_plan, make()))

    assert [[o.status for o in job] for job in outcomes] == [["failed"], ["changed"]]
    assert portal.bindings(refused) == [(LEAD, lead)]  # its bind failed: its unbind never ran
    assert portal.bindings(fine) == [(CONTACT, made["contact"])]
    # One shared call (each job's target read heading its writes) halted at the refused read; each job
    # then sent its binds, and the other job its unbind.
    assert portal.requests[0] == ("batch", 6) and len(portal.requests) <= 4


async def test_a_worker_under_load_sends_fewer_requests_and_every_activity_ends_right(
        client: Any, worker: Any, portal: FakePortal) -> None:
    made, activities = [], []
    for _ in range(10):
        lead = portal.add_lead()
        made.append(portal.convert_lead(lead))
        activities.append(portal.add_activity([(LEAD, lead)]))
    for activity in activities:
        await post_event(client, "ONCRMACTIVITYADD", activity)

    await worker.run_check()

    assert all(portal.bindings(a) == [(3, m["contact"]), (4, m["company"])] for a, m in zip(activities, made))
    assert len(portal.requests) < 3 * len(activities)  # each job alone makes 3


async def test_jobs_waiting_on_a_call_are_not_left_hanging_when_the_worker_stops(clients: Any,
                                                                                 portal: FakePortal) -> None:
    make, shared = clients
    activity = portal.add_activity([(LEAD, portal.add_lead())])
    portal.stall_next(1, 30.0)
    first = asyncio.create_task(make().batch(bindings_of(activity)))
    await asyncio.sleep(0.2)  # its call is on its way, and stuck
    second = asyncio.create_task(make().batch(bindings_of(activity)))
    await asyncio.sleep(0)  # waiting for the next call

    await asyncio.wait_for(shared.close(), timeout=5)  # the call on its way is stopped, not waited for

    outcomes = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), timeout=5)
    assert all(isinstance(outcome, asyncio.CancelledError) for outcome in outcomes)
    assert all(lane.sender is None for lane in shared._lanes.values())
