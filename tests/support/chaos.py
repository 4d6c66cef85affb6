"""What the chaos tests check once the dust settles, and the events they pour in."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from redis.exceptions import RedisError

from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
from app.store.jobs import FINAL_STATES, JobStore
from tests.conftest import event_form
from tests.support.waiting import until


def converted_leads(portal: FakePortal, events: int, rng: random.Random) -> list[tuple[str, int]]:
    """Leads with activities, converted: a lead event and an event per activity, about `events` in all."""
    plan: list[tuple[str, int]] = []
    while len(plan) < events:
        lead = portal.add_lead()
        activities = [portal.add_activity([(LEAD, lead)]) for _ in range(rng.randint(1, 4))]
        portal.convert_lead(lead)
        plan += [("ONCRMLEADUPDATE", lead)] + [("ONCRMACTIVITYADD", a) for a in activities]
    rng.shuffle(plan)
    return plan



async def all_done(store: JobStore, job_ids: set[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = {job_id: await store.get(job_id) for job_id in job_ids}
            if all(r is not None and r.state in FINAL_STATES for r in records.values()):
                return records
        except (RedisError, OSError):  # Redis is restarting
            records = {}
        if time.monotonic() > deadline:
            pending = (
                {
                    i: (r.state.value if r else None)
                    for i, r in records.items()
                    if r is None or r.state not in FINAL_STATES
                }
                if records
                else {"?": "Redis unreachable"}
            )
            raise AssertionError(f"{len(pending)} jobs not finished: {list(pending.items())[:10]}")
        await asyncio.sleep(0.25)


def assert_every_activity_ended_right(portal: FakePortal) -> None:
    for activity_id in portal.activities:
        lead = next(i for t, i in portal.binding_history[activity_id][0] if t == LEAD)
        expected = [
            (CONTACT, int(portal.leads[lead]["CONTACT_ID"])),
            (COMPANY, int(portal.leads[lead]["COMPANY_ID"])),
        ]
        assert portal.bindings(activity_id) == expected, (activity_id, portal.binding_history[activity_id])
        assert all(portal.binding_history[activity_id]), f"activity {activity_id} was left with no binding"



def assert_moved_once_to(portal: FakePortal, activities: list[int], made: dict[str, int]) -> None:
    """Each activity ends bound to the contact and company its lead became, was never left with no
    binding, and went through no state twice (a write sent again would show as one)."""
    expected = [(CONTACT, made["contact"]), (COMPANY, made["company"])]
    assert all(portal.bindings(a) == expected for a in activities)
    for a in activities:
        history = portal.binding_history[a]
        assert all(history), f"activity {a} was left with no binding: {history}"
        assert len(set(history)) == len(history), f"activity {a} went through a state twice: {history}"


@dataclass
class Stream:
    """Events at a steady pace, as a portal posts them: a converted lead's update, and its activity's."""

    portal: FakePortal
    url: str
    accepted: set[str] = field(default_factory=set)
    spooled: int = 0
    refused: list[tuple[int, str]] = field(default_factory=list)
    sent: int = 0
    # Stopped between leads, never by cancelling: a lead converted whose events were never posted
    # would stay bound to its lead, rightly, and read as the service's fault.
    stopped: bool = False

    async def post(self, session: aiohttp.ClientSession, event: str, entity: int) -> None:
        self.sent += 1
        body = event_form(event, entity, ts=1766047124 + self.sent)
        async with session.post(self.url, data=body,
                                headers={"Content-Type": "application/x-www-form-urlencoded"}) as response:
            answer = await response.json()
        if response.status != 200:
            self.refused.append((response.status, str(answer)))
            return
        self.accepted.add(answer["job_id"])
        self.spooled += bool(answer.get("spooled"))

    async def run(self, session: aiohttp.ClientSession, every: float = 0.1) -> None:
        while not self.stopped:
            lead = self.portal.add_lead()
            activity = self.portal.add_activity([(LEAD, lead)])
            self.portal.convert_lead(lead)
            await self.post(session, "ONCRMLEADUPDATE", lead)
            await self.post(session, "ONCRMACTIVITYADD", activity)
            await asyncio.sleep(every)


async def answers(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url) as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


@asynccontextmanager
async def streaming_through_a_big_conversion(portal: FakePortal, session: aiohttp.ClientSession, events_url: str,
                                             activities: int) -> AsyncIterator[Stream]:
    """A lead of `activities` activities converted and its event posted, with a `Stream` of events beside
    it; the body runs once the service is under way on the big conversion (an activity's third binding
    state: the portal's conversion is its second), and the stream stops after it, between leads."""
    stream = Stream(portal, events_url)
    big = portal.add_lead()
    big_activities = [portal.add_activity([(LEAD, big)]) for _ in range(activities)]
    portal.convert_lead(big)
    await stream.post(session, "ONCRMLEADUPDATE", big)
    streaming = asyncio.create_task(stream.run(session))
    try:
        async def conversion_under_way() -> bool:
            return any(len(portal.binding_history[a]) > 2 for a in big_activities)

        await until(conversion_under_way, 60, "the big conversion to start")
        yield stream
    finally:
        stream.stopped = True
        await streaming
