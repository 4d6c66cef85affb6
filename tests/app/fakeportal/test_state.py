"""The CRM as a real portal changes it (protocol section 0): conversions, owners, deletions, closing leads."""

from __future__ import annotations

import aiohttp

from app.fakeportal import COMPANY, CONTACT, DEAL, LEAD, FakePortal
from tests.app.fakeportal.conftest import call


async def test_convert_lead_creates_entities(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    lead = portal.add_lead("Website order", name="Ann", email="ann@example.com")
    activity = portal.add_activity([(LEAD, lead)])
    created = portal.convert_lead(lead, deal=True)
    # The portal copies: every created record gets a binding, the lead binding stays, and so does the
    # lead as the owner (AttachBinding does not recalculate it).
    assert portal.bindings(activity) == sorted([(LEAD, lead), (DEAL, created["deal"]),
                                                (CONTACT, created["contact"]), (COMPANY, created["company"])])
    assert (portal.activities[activity]["OWNER_TYPE_ID"], portal.activities[activity]["OWNER_ID"]) == (
        str(LEAD), str(lead))
    status, body = await call(session, portal, "crm.lead.get", {"id": lead})
    assert body["result"]["STATUS_ID"] == "CONVERTED" and body["result"]["STATUS_SEMANTIC_ID"] == "S"
    assert body["result"]["CONTACT_ID"] == str(created["contact"])
    for method, key in (
        ("crm.contact.list", "contact"),
        ("crm.company.list", "company"),
        ("crm.deal.list", "deal"),
    ):
        status, body = await call(session, portal, method, {"filter": {"LEAD_ID": lead}})
        assert [row["ID"] for row in body["result"]] == [str(created[key])]
    status, body = await call(session, portal, "crm.lead.list", {"filter": {"STATUS_SEMANTIC_ID": "S"}})
    assert body["total"] == 1
    status, body = await call(
        session,
        portal,
        "crm.duplicate.findbycomm",
        {"type": "EMAIL", "values": ["ANN@example.com"], "entity_type": "CONTACT"},
    )
    assert body["result"] == {"CONTACT": [created["contact"]]}
    status, body = await call(
        session, portal, "crm.duplicate.findbycomm", {"type": "PHONE", "values": ["+1 555"]}
    )
    assert body["result"] == []


async def test_conversion_copies_activities_and_comments_and_keeps_the_lead(
    portal: FakePortal, session: aiohttp.ClientSession
) -> None:
    lead = portal.add_lead("Order", name="Ann")
    activity = portal.add_activity([(LEAD, lead)])
    comment = portal.add_timeline_comment("lead", lead, "called back")
    portal.events.clear()
    made = portal.convert_lead(lead, contact=True, company=True, deal=True)
    assert portal.events == [("ONCRMCOMPANYADD", made["company"]), ("ONCRMCONTACTADD", made["contact"]),
                             ("ONCRMDEALADD", made["deal"]), ("ONCRMLEADUPDATE", lead)]  # no activity update
    status, body = await call(session, portal, "crm.activity.binding.list", {"activityId": activity})
    assert body["result"] == [{"entityTypeId": LEAD, "entityId": lead},
                              {"entityTypeId": COMPANY, "entityId": made["company"]},
                              {"entityTypeId": CONTACT, "entityId": made["contact"]},
                              {"entityTypeId": DEAL, "entityId": made["deal"]}]
    assert portal.comment_bindings(comment) == sorted([("lead", lead), ("company", made["company"]),
                                                       ("contact", made["contact"]), ("deal", made["deal"])])


async def test_repeat_lead_makes_only_a_deal(portal: FakePortal) -> None:
    contact, company = portal.add_contact("Ann"), portal.add_company("Acme")
    lead = portal.add_lead("Ann again", contact_id=contact, company_id=company)
    activity = portal.add_activity([(LEAD, lead)])
    contacts_before = set(portal.contacts)
    made = portal.convert_lead(lead)  # asked for a contact and a company: a repeat lead makes a deal only
    assert made["contact"] is None and made["company"] is None and made["deal"]
    assert set(portal.contacts) == contacts_before
    assert portal.bindings(activity) == [(LEAD, lead), (DEAL, made["deal"])]  # the client gets nothing
    assert portal.deals[made["deal"]]["CONTACT_ID"] == str(contact)


async def test_rest_conversion_attaches_nothing(portal: FakePortal) -> None:
    lead = portal.add_lead("Order", name="Ann")
    activity = portal.add_activity([(LEAD, lead)])
    portal.events.clear()
    contact = portal.convert_lead_over_rest(lead)
    assert portal.events == [("ONCRMCONTACTADD", contact), ("ONCRMLEADUPDATE", lead)]
    assert portal.bindings(activity) == [(LEAD, lead)]
    assert portal.leads[lead]["STATUS_SEMANTIC_ID"] == "S" and portal.leads[lead]["CONTACT_ID"] == str(contact)
    assert portal.contacts[contact].get("LEAD_ID") in (None, "")  # read-only over REST


async def test_owner_is_recalculated_on_every_save(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    lead, contact, deal = portal.add_lead(), portal.add_contact(), portal.add_deal()
    activity = portal.add_activity([(LEAD, lead)])

    def owner() -> tuple[int, int]:
        row = portal.activities[activity]
        return int(row["OWNER_TYPE_ID"]), int(row["OWNER_ID"])

    ids = {"activityId": activity}
    await call(session, portal, "crm.activity.binding.add", {**ids, "entityTypeId": CONTACT, "entityId": contact})
    assert owner() == (LEAD, lead)  # a contact never takes over from another type
    await call(session, portal, "crm.activity.binding.add", {**ids, "entityTypeId": DEAL, "entityId": deal})
    assert owner() == (DEAL, deal)  # the last binding that is not a contact or company
    await call(session, portal, "crm.activity.binding.delete", {**ids, "entityTypeId": DEAL, "entityId": deal})
    assert owner() == (LEAD, lead)
    await call(session, portal, "crm.activity.binding.delete", {**ids, "entityTypeId": LEAD, "entityId": lead})
    assert owner() == (CONTACT, contact)  # else the first


async def test_deleting_a_record_takes_its_bindings_and_is_not_a_violation(portal: FakePortal) -> None:
    lead, contact = portal.add_lead(), portal.add_contact()
    shared = portal.add_activity([(LEAD, lead), (CONTACT, contact)])
    only_contact = portal.add_activity([(CONTACT, contact)])
    portal.delete_entity(CONTACT, contact)
    assert portal.bindings(shared) == [(LEAD, lead)]
    assert only_contact not in portal.activities
    assert portal.check_invariants() == []


async def test_a_lead_closing_completes_its_open_calls_and_todos(portal: FakePortal) -> None:
    lead = portal.add_lead()
    call, todo, email = (portal.add_activity([(LEAD, lead)], type_id=t) for t in (2, 6, 4))
    portal.events.clear()
    portal.convert_lead(lead, contact=True, company=False)
    assert portal.events[-2:] == [("ONCRMACTIVITYUPDATE", call), ("ONCRMACTIVITYUPDATE", todo)]
    assert [portal.activities[a]["COMPLETED"] for a in (call, todo, email)] == ["Y", "Y", "N"]


async def test_the_lead_is_closed_before_its_activities_are_attached(portal: FakePortal) -> None:
    lead = portal.add_lead()
    call = portal.add_activity([(LEAD, lead)], type_id=2)
    made = portal.convert_lead(lead, contact=True, company=False)
    # Completed while bound to the lead alone, then the contact attached: the history shows that order.
    assert portal.activities[call]["COMPLETED"] == "Y"
    assert portal.binding_history[call] == [((LEAD, lead),), tuple(sorted([(LEAD, lead), (CONTACT, made["contact"])]))]


async def test_binding_writes_echo_to_the_subscribed_handler_after_the_request(
        portal: FakePortal, session: aiohttp.ClientSession) -> None:
    from aiohttp import web

    heard: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        heard.append({k: str(v) for k, v in (await request.post()).items()})
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/events", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        lead, contact, other = portal.add_lead(), portal.add_contact(), portal.add_lead()
        activity = portal.add_activity([(LEAD, lead)])
        ids = {"activityId": activity}
        await call(session, portal, "crm.activity.binding.add", {**ids, "entityTypeId": CONTACT, "entityId": contact})
        assert portal.echoes == [("ONCRMACTIVITYUPDATE", activity)] and heard == []  # not subscribed: recorded only
        portal.subscribe(f"http://127.0.0.1:{port}/events", "app-token", "acme.bitrix24.com")
        await call(session, portal, "crm.activity.binding.move", {**ids, "sourceEntityTypeId": LEAD,
                   "sourceEntityId": lead, "targetEntityTypeId": LEAD, "targetEntityId": other})
        # The target is appended last, not put in the lead's place.
        assert portal.binding_history[activity][-1] == tuple(sorted([(CONTACT, contact), (LEAD, other)]))
        assert list(portal.activity_bindings[activity]) and portal._binding_order[activity][-1] == (LEAD, other)
        await call(session, portal, "crm.activity.binding.delete", {**ids, "entityTypeId": CONTACT, "entityId": contact})
        await call(session, portal, "crm.activity.binding.delete", {**ids, "entityTypeId": LEAD, "entityId": other})
        await portal.echoes_sent()
        assert len(portal.echoes) == 3  # the refused delete (the last binding) fires nothing
        assert [(h["event"], h["data[FIELDS][ID]"], h["auth[application_token]"]) for h in heard] == \
            [("ONCRMACTIVITYUPDATE", str(activity), "app-token")] * 2
    finally:
        await runner.cleanup()
