"""What the chaos tests check once the dust settles, and the events they pour in."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from redis.exceptions import RedisError

from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
from app.store.jobs import FINAL_STATES, JobStore


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
