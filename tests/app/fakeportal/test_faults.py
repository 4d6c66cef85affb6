"""Limits and injected faults: the request limit, errors and HTML pages, a person acting between
read and write, a user without rights, and the operating-time limit charged to `batch`."""

from __future__ import annotations

import aiohttp

from app.fakeportal import CONTACT, LEAD, FakePortal
from tests.app.fakeportal.conftest import call


async def test_rate_limit_burst(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    portal.set_rate_limit(per_second=1, burst=3)
    lead = portal.add_lead()
    statuses = []
    for _ in range(5):
        status, body = await call(session, portal, "crm.lead.get", {"id": lead})
        statuses.append(status)
    assert statuses == [200, 200, 200, 503, 503]
    assert body == {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"}


async def test_batch_is_one_request_for_the_limit(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    portal.set_rate_limit(per_second=1, burst=2)
    lead = portal.add_lead()
    cmd = {str(i): f"crm.lead.get?id={lead}" for i in range(50)}
    status, body = await call(session, portal, "batch", {"cmd": cmd})
    assert status == 200 and len(body["result"]["result"]) == 50
    assert (await call(session, portal, "crm.lead.get", {"id": lead}))[0] == 200
    assert (await call(session, portal, "crm.lead.get", {"id": lead}))[0] == 503


async def test_leaky_bucket_drains_with_the_clock() -> None:
    now = [0.0]
    fake = FakePortal(per_second=2, burst=2, clock=lambda: now[0])
    assert fake._bucket is not None
    assert [fake._bucket.try_take() for _ in range(3)] == [True, True, False]
    now[0] += 0.5  # one request drained
    assert [fake._bucket.try_take() for _ in range(2)] == [True, False]


async def test_fail_next_and_html_next(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    lead = portal.add_lead()
    portal.fail_next(1)
    portal.fail_next(1, status=503, error="QUERY_LIMIT_EXCEEDED")
    assert await call(session, portal, "crm.lead.get", {"id": lead}) == (
        500,
        {"error": "INTERNAL_SERVER_ERROR", "error_description": "Internal server error"},
    )
    assert (await call(session, portal, "crm.lead.get", {"id": lead}))[1]["error"] == "QUERY_LIMIT_EXCEEDED"
    portal.html_next(1)
    async with session.post(portal.rest_url + "crm.lead.get", json={"id": lead}) as response:
        assert response.status == 502 and response.content_type == "text/html"
    status, body = await call(session, portal, "crm.lead.get", {"id": lead})
    assert (status, body["result"]["ID"]) == (200, str(lead))
    assert portal.request_count == 4


async def test_before_request_changes_the_crm_between_read_and_write(
    portal: FakePortal, session: aiohttp.ClientSession
) -> None:
    contact = portal.add_contact()
    portal.before_request("crm.contact.get", lambda: portal.delete_entity(CONTACT, contact))
    assert (await call(session, portal, "crm.lead.get", {"id": 5}))[1]["error"] == ""  # not this one
    assert contact in portal.contacts
    status, body = await call(session, portal, "crm.contact.get", {"id": contact})
    assert body == {"error": "", "error_description": "Not found"}


async def test_a_webhook_user_without_rights_sees_less_and_changes_nothing(
    portal: FakePortal, session: aiohttp.ClientSession
) -> None:
    lead, hidden_contact, contact = portal.add_lead(), portal.add_contact(), portal.add_contact()
    activity = portal.add_activity([(LEAD, lead), (CONTACT, hidden_contact)])
    private = portal.add_activity([(CONTACT, hidden_contact)])
    portal.set_access_denied({(CONTACT, hidden_contact)})
    status, body = await call(session, portal, "crm.activity.binding.list", {"activityId": activity})
    assert body["result"] == [{"entityTypeId": LEAD, "entityId": lead}]
    status, body = await call(session, portal, "crm.contact.list", {})
    assert [row["ID"] for row in body["result"]] == [str(contact)]
    status, body = await call(session, portal, "crm.activity.list", {})
    assert str(private) not in [row["ID"] for row in body["result"]]
    status, body = await call(session, portal, "crm.contact.get", {"id": hidden_contact})
    assert body["error_description"] == "Access denied."
    status, body = await call(session, portal, "crm.activity.binding.delete",
                              {"activityId": activity, "entityTypeId": CONTACT, "entityId": hidden_contact})
    assert (status, body["error"]) == (403, "ACCESS_DENIED")
    assert portal.bindings(activity) == [(LEAD, lead), (CONTACT, hidden_contact)]


async def test_a_portal_that_charges_batches_to_batch(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    lead = portal.add_lead()
    portal.set_operating_limit(3.0, cost_per_call=1.0, charge_batch=True)
    cmd = {"a": f"crm.lead.get?id={lead}", "b": f"crm.contact.list?filter[LEAD_ID]={lead}"}

    status, body = await call(session, portal, "batch", {"cmd": cmd})

    assert status == 200
    times = body["result"]["result_time"]
    # One batch-wide figure on every command, and on the call: the methods themselves are not charged.
    assert times["a"]["operating"] == times["b"]["operating"] == body["time"]["operating"] == 2.0
    assert portal.operating("crm.lead.get") == 0.0 and portal.operating("batch") == 2.0
    await call(session, portal, "batch", {"cmd": {"a": f"crm.lead.get?id={lead}"}})
    status, body = await call(session, portal, "batch", {"cmd": cmd})
    assert (status, body["error"]) == (429, "OPERATION_TIME_LIMIT")
    status, body = await call(session, portal, "crm.lead.get", {"id": lead})  # other methods still work
    assert status == 200
