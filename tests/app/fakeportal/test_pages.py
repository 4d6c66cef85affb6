"""The demo portal's record pages: what the dashboard's links open, at the real portal's paths."""

from __future__ import annotations

import re

import aiohttp

from app.fakeportal import CONTACT, LEAD, FakePortal


async def page(session: aiohttp.ClientSession, portal: FakePortal, path: str) -> tuple[int, str]:
    async with session.get(portal.base_url + path) as response:
        assert response.content_type == "text/html"
        return response.status, await response.text()


async def test_a_converted_lead_shows_what_it_became_and_its_timeline(
        portal: FakePortal, session: aiohttp.ClientSession) -> None:
    lead = portal.add_lead(title="Anna <Smith>", email="anna@example.com")
    activity = portal.add_activity([(LEAD, lead)], subject="Re: price list")
    made = portal.convert_lead(lead)
    comment = portal.add_timeline_comment("lead", lead, "called back")

    status, html = await page(session, portal, f"/crm/lead/details/{lead}/")

    assert status == 200
    assert f"Lead {lead}: Anna &lt;Smith&gt;" in html  # escaped, never markup
    assert f'<a href="/crm/contact/details/{made["contact"]}/">contact {made["contact"]}</a>' in html
    row = re.search(rf"<tr data-activity={activity}>.*?</tr>", html)
    assert row and "Re: price list" in row[0]
    assert f"contact {made['contact']}" in row[0] and f"company {made['company']}" in row[0] and f"lead {lead}" in row[0]
    assert f"comment {comment}: called back" in html
    assert "Bound here before" not in html

    await session.post(portal.rest_url + "crm.activity.binding.delete",
                       json={"activityId": activity, "entityTypeId": LEAD, "entityId": lead})
    _, html = await page(session, portal, f"/crm/lead/details/{lead}/")
    assert f"<tr data-activity={activity}>" not in html  # off the lead's timeline...
    moved = re.search(rf"<li data-moved={activity}>.*?</li>", html)  # ...and said where it went
    assert moved and f"contact {made['contact']}" in moved[0] and f"lead {lead}" not in moved[0]


async def test_a_contact_lists_the_activities_bound_to_it_and_an_activity_its_binding_history(
        portal: FakePortal, session: aiohttp.ClientSession) -> None:
    lead = portal.add_lead()
    contact = portal.convert_lead(lead)["contact"]
    assert contact is not None
    activity = portal.add_activity([(LEAD, lead)])  # after the conversion: bound to the lead only
    portal.bind_by_hand(activity, (CONTACT, contact))

    _, html = await page(session, portal, f"/crm/contact/details/{contact}/")
    assert f"<tr data-activity={activity}>" in html
    assert f'<a href="/crm/lead/details/{lead}/">lead {lead}</a>' in html  # LEAD_ID, as a link

    status, html = await page(session, portal, f"/crm/activity/details/{activity}")
    assert status == 200
    steps = re.findall(r"<li>(.*?)</li>", html)
    assert len(steps) == 2 and f"contact {contact}" not in steps[0] and f"contact {contact}" in steps[1]


async def test_a_record_that_does_not_exist_is_a_404_page_that_says_why(
        portal: FakePortal, session: aiohttp.ClientSession) -> None:
    status, html = await page(session, portal, "/crm/deal/details/999/")
    assert status == 404 and "no such record" in html and "restarted demo starts empty" in html
    status, _ = await page(session, portal, "/crm/deal/details/x<script>/")
    assert status == 404
