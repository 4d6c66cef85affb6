"""The executor against the fake portal: a small plan in one halting batch, and what a refusal leaves."""
from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from app.bitrix.client import RestClient, RetryPolicy
from app.bitrix.portal import PortalConfig
from app.bitrix.ratelimit import LocalRateLimiter
from app.fakeportal.portal import COMPANY, CONTACT, LEAD, FakePortal
from app.rebind.executor import execute
from app.rules.facts import Binding
from app.rules.model import EntityType
from app.rules.plan import ActivityPlan, BindingPlan

MISSING_CONTACT = 9999


@pytest.fixture
async def rest(portal: FakePortal, portal_config: PortalConfig) -> AsyncIterator[RestClient]:
    async with aiohttp.ClientSession() as session:
        yield RestClient(session, portal_config, LocalRateLimiter(), retry=RetryPolicy(attempts=2, base=0.01))


def rebind(activity: int, lead: int, contact: int, company: int | None = None) -> ActivityPlan:
    """Move an activity from its lead to a contact (and a company)."""
    after = (Binding(entity_type=EntityType.CONTACT, entity_id=contact),
             *([Binding(entity_type=EntityType.COMPANY, entity_id=company)] if company else []))
    return ActivityPlan(activity_id=activity, before=(Binding(entity_type=EntityType.LEAD, entity_id=lead),),
                        after=after)


async def test_a_single_activity_is_rebound_in_one_request(rest: RestClient, portal: FakePortal) -> None:
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])

    plan = BindingPlan(activities=(rebind(activity, lead, made["contact"], made["company"]),))
    outcomes = await execute(plan, rest)

    assert [o.status for o in outcomes] == ["changed"]
    assert portal.bindings(activity) == [(CONTACT, made["contact"]), (COMPANY, made["company"])]
    assert portal.requests == [("batch", 3)]
    # The portal's history: never without a binding, and the lead goes only after both binds.
    assert portal.binding_history[activity][-2:] == [
        ((LEAD, lead), (CONTACT, made["contact"]), (COMPANY, made["company"])),
        ((CONTACT, made["contact"]), (COMPANY, made["company"]))]


async def test_a_refused_bind_stops_the_batch_before_the_unbind(rest: RestClient, portal: FakePortal) -> None:
    lead = portal.add_lead()
    activity = portal.add_activity([(LEAD, lead)])

    outcomes = await execute(BindingPlan(activities=(rebind(activity, lead, MISSING_CONTACT),)), rest)

    assert [(o.status, o.errors[0]["code"]) for o in outcomes] == [("failed", "OWNER_NOT_FOUND")]
    assert portal.bindings(activity) == [(LEAD, lead)]
    assert portal.requests == [("batch", 2)]  # halted at the bind: the unbind never ran, nothing more sent


async def test_after_a_halt_the_other_activities_are_still_rebound(rest: RestClient,
                                                                   portal: FakePortal) -> None:
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    refused, fine = portal.add_activity([(LEAD, lead)]), portal.add_activity([(LEAD, lead)])

    outcomes = await execute(BindingPlan(activities=(rebind(refused, lead, MISSING_CONTACT),
                                                     rebind(fine, lead, made["contact"]))), rest)

    assert {o.id: o.status for o in outcomes} == {refused: "failed", fine: "changed"}
    assert portal.bindings(refused) == [(LEAD, lead)]
    assert portal.bindings(fine) == [(CONTACT, made["contact"])]
    # The halting batch, then phase by phase for what it did not reach: the bind, then the unbind.
    assert portal.requests == [("batch", 4), ("batch", 1), ("batch", 1)]
