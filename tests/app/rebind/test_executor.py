"""The executor against the fake portal: a small plan in one halting batch, and what a refusal leaves."""
from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from app.bitrix.client import RestClient, RetryPolicy
from app.portal_config import PortalConfig
from app.bitrix.ratelimit import LocalRateLimiter
from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
from app.rebind.executor import TargetsGone, execute
from app.rules.facts import Binding
from app.rules.model import EntityType
from app.rules.plan import BindingPlan
from tests.support.plans import rebind

MISSING_CONTACT = 9999


@pytest.fixture
async def rest(portal: FakePortal, portal_config: PortalConfig) -> AsyncIterator[RestClient]:
    async with aiohttp.ClientSession() as session:
        yield RestClient(session, portal_config, LocalRateLimiter(), retry=RetryPolicy(attempts=2, base=0.01))


async def test_a_single_activity_is_rebound_in_one_request(rest: RestClient, portal: FakePortal) -> None:
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])

    plan = BindingPlan(activities=(rebind(activity, lead, made["contact"], made["company"]),))
    outcomes = await execute(plan, rest)

    assert [o.status for o in outcomes] == ["changed"]
    assert portal.bindings(activity) == [(CONTACT, made["contact"]), (COMPANY, made["company"])]
    assert portal.requests == [("batch", 5)]  # the targets' two reads head the three writes
    # The portal's history: never without a binding, and the lead goes only after both binds.
    assert portal.binding_history[activity][-2:] == [
        ((LEAD, lead), (CONTACT, made["contact"]), (COMPANY, made["company"])),
        ((CONTACT, made["contact"]), (COMPANY, made["company"]))]


async def test_a_missing_target_stops_the_batch_before_any_write(rest: RestClient, portal: FakePortal) -> None:
    lead = portal.add_lead()
    activity = portal.add_activity([(LEAD, lead)])

    with pytest.raises(TargetsGone) as gone:
        await execute(BindingPlan(activities=(rebind(activity, lead, MISSING_CONTACT),)), rest)

    assert gone.value.targets == {Binding(entity_type=EntityType.CONTACT, entity_id=MISSING_CONTACT)}
    assert portal.bindings(activity) == [(LEAD, lead)]  # a portal would have bound it to nothing real
    assert portal.requests == [("batch", 3)]  # halted at the read of the target: nothing more sent
    assert portal.violations == []


async def test_a_refused_bind_stops_the_batch_before_the_unbind(rest: RestClient, portal: FakePortal) -> None:
    lead, contact = portal.add_lead(), portal.add_contact()
    activity = portal.add_activity([(LEAD, lead)])
    portal.set_access_denied({(CONTACT, contact)})

    outcomes = await execute(BindingPlan(activities=(rebind(activity, lead, contact),)), rest)

    assert [(o.status, o.errors[0]["code"]) for o in outcomes] == [("failed", "ACCESS_DENIED")]
    assert portal.bindings(activity) == [(LEAD, lead)]
    # The read of the target halted the batch; the bind and unbind went again, and the refused bind
    # halted that call before the unbind.
    assert portal.requests == [("batch", 3), ("batch", 2)]


async def test_after_a_halt_the_other_activities_are_still_rebound(rest: RestClient,
                                                                   portal: FakePortal) -> None:
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    refused, fine = portal.add_activity([(LEAD, lead)]), portal.add_activity([(LEAD, lead)])
    hidden = portal.add_contact()
    portal.set_access_denied({(CONTACT, hidden)})

    outcomes = await execute(BindingPlan(activities=(rebind(refused, lead, hidden),
                                                     rebind(fine, lead, made["contact"]))), rest)

    assert {o.id: o.status for o in outcomes} == {refused: "failed", fine: "changed"}
    assert portal.bindings(refused) == [(LEAD, lead)]
    assert portal.bindings(fine) == [(CONTACT, made["contact"])]
    # The plan as one halting group: halted at the hidden target's read, then at the refused bind; the
    # rest of the binds, then the other activity's unbind on its own.
    assert portal.requests == [("batch", 6), ("batch", 4), ("batch", 1), ("batch", 1)]
