"""Working at the portal's limits: the shared request budget, method time budgets, locks, big leads."""
from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from app.bitrix.client import RestClient
from app.portal_config import RateLimit
from app.bitrix.ratelimit import RateLimiter
from app.fakeportal import COMPANY, CONTACT, DEAL, LEAD, FakePortal
from app.rebind.reading import FactReader
from tests.conftest import DEFAULT_RULES, post_event, rules_with


async def test_four_workers_together_stay_inside_the_portals_limit(client: Any, make_worker: Any,
                                                                   portal: FakePortal, rules: Any) -> None:
    limited = rules.portals["acme"].model_copy(update={"rate_limit": RateLimit(per_second=20, burst=5)})
    shared_rules = rules.model_copy(update={"portals": {"acme": limited}})
    portal.set_rate_limit(per_second=20, burst=5)
    activities = []
    for _ in range(60):
        lead = portal.add_lead()
        portal.convert_lead(lead)
        activities.append(portal.add_activity([(LEAD, lead)]))
    for activity in activities:
        await post_event(client, "ONCRMACTIVITYADD", activity)

    await asyncio.gather(*(make_worker(rules=shared_rules).run_check() for _ in range(4)))

    # Well past the burst of 5 (the four workers' jobs share calls: 24 events took 8 requests).
    assert len(portal.requests) > 2 * 5
    assert all(len(portal.bindings(a)) == 2 for a in activities)
    assert portal.refused_for_rate == 0


async def test_a_method_near_its_time_budget_defers_the_job_until_it_resets(client: Any, make_worker: Any,
                                                                            portal: FakePortal,
                                                                            portal_config: Any) -> None:
    rules = rules_with(DEFAULT_RULES, portal_config.model_copy(update={"operating_budget": 10.0}))
    portal.set_operating_limit(10.0, cost_per_call=1.0, window=2.0)
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(8)]

    answers = [await post_event(client, "ONCRMACTIVITYADD", a) for a in activities]
    await make_worker(rules=rules, max_jobs=1).run_check()

    for activity in activities:
        assert portal.bindings(activity) == [(CONTACT, made["contact"]), (COMPANY, made["company"])]
    jobs = [await (await client.get(f"/api/jobs/{answer['job_id']}")).json() for _, answer in answers]
    outcomes = [a["outcome"] for job in jobs for a in job["attempts"]]
    assert "deferred" in outcomes, outcomes
    assert all(job["state"] == "succeeded" for job in jobs)
    assert portal.blocked_for_time == 0, "the service stopped before the portal had to block a method"


async def test_events_of_one_conversion_do_the_work_once(client: Any, make_worker: Any, portal: FakePortal) -> None:
    lead = portal.add_lead()
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(60)]
    made = portal.convert_lead(lead, deal=True)
    await post_event(client, "ONCRMLEADUPDATE", lead)
    await post_event(client, "ONCRMCONTACTADD", made["contact"])
    await post_event(client, "ONCRMCOMPANYADD", made["company"])
    await post_event(client, "ONCRMDEALADD", made["deal"])

    await asyncio.gather(*(make_worker().run_check() for _ in range(4)))

    for activity in activities:
        expected = [(DEAL, made["deal"]), (CONTACT, made["contact"]), (COMPANY, made["company"])]
        assert portal.bindings(activity) == expected
        # Made with the lead, the conversion's copy, and the unbind of the lead: by one job only.
        assert len(portal.binding_history[activity]) == 3, "the lead unbound once, by one job"


@pytest.mark.slow
async def test_10000_activities_are_paged_in_batches_once_their_count_is_known(portal: FakePortal, rules: Any,
                                                                               redis: Any) -> None:
    lead = portal.add_lead()
    for _ in range(10_000):
        portal.add_activity([(LEAD, lead)])
    portal.convert_lead(lead)
    portal.reset_counters()

    async with aiohttp.ClientSession() as http:
        client = RestClient(http, rules.portals["acme"], RateLimiter(redis))
        facts = await FactReader(client, rules).for_lead("ONCRMLEADUPDATE", lead)

    assert len(facts.activities) == 10_000
    # The first page (with the count) in the lead's batch; the other 199 with one activity's bindings
    # (the portal attached it to the contact: every binding is read) in 4 batches; 200 of binding reads.
    assert [r.method for r in portal.requests] == ["batch"] * (1 + 4 + 200)
    assert portal.method_calls["crm.activity.list"] == 200
