"""The REST methods over the CRM: bindings, records, timeline comments and the methods `doctor` asks."""

from __future__ import annotations

import aiohttp

from app.fakeportal import COMPANY, CONTACT, DEAL, LEAD, SMART_INVOICE, FakePortal
from tests.app.fakeportal.conftest import call


async def test_binding_add_list_delete(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    lead = portal.add_lead()
    contact = portal.add_contact("Ann", lead_id=lead)
    activity = portal.add_activity([(LEAD, lead)])
    ids = {"activityId": activity, "entityTypeId": CONTACT, "entityId": contact}

    status, body = await call(session, portal, "crm.activity.binding.add.json", ids)
    assert (status, body["result"]) == (200, True)
    assert {"start", "finish", "duration", "date_start", "operating_reset_at"} <= body["time"].keys()
    status, body = await call(session, portal, "crm.activity.binding.add", ids)
    assert (status, body["error"]) == (400, "ACTIVITY_IS_ALREADY_BOUND")

    status, body = await call(session, portal, "crm.activity.binding.list", {"activityId": str(activity)})
    assert body["result"] == [{"entityTypeId": 1, "entityId": lead}, {"entityTypeId": 3, "entityId": contact}]

    lead_ids = {"activityId": activity, "entityTypeId": LEAD, "entityId": lead}
    assert (await call(session, portal, "crm.activity.binding.delete", lead_ids))[1]["result"] is True
    status, body = await call(session, portal, "crm.activity.binding.delete", lead_ids)
    assert (status, body["error"]) == (400, "BINDING_NOT_FOUND")
    status, body = await call(session, portal, "crm.activity.binding.delete", ids)
    assert (status, body) == (
        400,
        {"error": "LAST_BINDING_CANNOT_BE_DELETED", "error_description": "Cannot delete the only binding"},
    )
    # The owner switched to the contact once it was the only binding left.
    assert (portal.activities[activity]["OWNER_TYPE_ID"], portal.activities[activity]["OWNER_ID"]) == (
        "3",
        str(contact),
    )
    assert portal.binding_history[activity] == [((1, lead),), ((1, lead), (3, contact)), ((3, contact),)]
    assert all(portal.binding_history[activity])  # never unbound


async def test_binding_errors(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    lead = portal.add_lead()
    activity = portal.add_activity([(LEAD, lead)])
    status, body = await call(session, portal, "crm.activity.binding.add", {"entityTypeId": 3, "entityId": 1})
    assert (status, body) == (
        400,
        {"error": 100, "error_description": "Could not find value for parameter {activityId}"},
    )
    status, body = await call(session, portal, "crm.activity.binding.list", {"activityId": 999})
    assert (status, body) == (400, {"error": "NOT_FOUND", "error_description": "Element not found"})
    status, body = await call(
        session,
        portal,
        "crm.activity.binding.add",
        {"activityId": activity, "entityTypeId": CONTACT, "entityId": 42},
    )
    # A real portal never checks the target: the binding is saved, and left dangling.
    assert (status, body["result"]) == (200, True)
    assert portal.bindings(activity) == [(LEAD, lead), (CONTACT, 42)]
    assert portal.violations == [f"activity {activity} was bound to contact 42, which does not exist"]
    portal.violations.clear()


async def test_a_101st_binding_drops_the_lowest_owner_id_without_a_word(
        portal: FakePortal, session: aiohttp.ClientSession) -> None:
    leads = [portal.add_lead() for _ in range(101)]
    contact = portal.add_contact("Ann")  # contact 1: the lowest owner id once the leads are there
    activity = portal.add_activity([(LEAD, lead) for lead in leads[1:100]])
    portal.bind_by_hand(activity, (CONTACT, contact))  # 100, by hand: nothing dropped, no violation
    assert portal.violations == []

    status, body = await call(session, portal, "crm.activity.binding.add",
                              {"activityId": activity, "entityTypeId": LEAD, "entityId": leads[100]})

    assert (status, body["result"]) == (200, True)  # crm 25.1150.0 and later: true, and one binding gone
    assert len(portal.bindings(activity)) == 100 and (CONTACT, contact) not in portal.bindings(activity)
    assert portal.violations == [f"activity {activity} lost its binding to contact {contact}: a REST write "
                                 "took it past 100 bindings"]
    portal.violations.clear()


async def test_an_older_portal_has_no_binding_cap(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    portal.max_bindings = None
    leads = [portal.add_lead() for _ in range(101)]
    activity = portal.add_activity([(LEAD, lead) for lead in leads[:100]])
    status, body = await call(session, portal, "crm.activity.binding.add",
                              {"activityId": activity, "entityTypeId": LEAD, "entityId": leads[100]})
    assert (status, body["result"]) == (200, True) and len(portal.bindings(activity)) == 101


async def test_timeline_bindings_answer_false_for_no_rights_a_missing_comment_or_a_failed_save(
        portal: FakePortal, session: aiohttp.ClientSession) -> None:
    lead = portal.add_lead()
    contact, other = portal.add_contact("Ann"), portal.add_contact("Bob")
    comment = portal.add_timeline_comment("lead", lead, "called")
    portal.set_access_denied({(CONTACT, other)})

    def fields(owner: int, entity: int) -> dict[str, object]:
        return {"fields": {"OWNER_ID": owner, "ENTITY_TYPE": "contact", "ENTITY_ID": entity}}

    for method in ("crm.timeline.bindings.bind", "crm.timeline.bindings.unbind"):
        for params in (fields(comment, other), fields(999, contact)):  # no rights; no such comment
            status, body = await call(session, portal, method, params)
            assert (status, body["result"]) == (200, False), (method, params)
    portal.timeline_saves_fail = True
    assert (await call(session, portal, "crm.timeline.bindings.bind", fields(comment, contact)))[1]["result"] is False
    portal.timeline_saves_fail = False
    assert (await call(session, portal, "crm.timeline.bindings.bind", fields(comment, contact)))[1]["result"] is True
    assert (await call(session, portal, "crm.timeline.bindings.bind", fields(comment, contact)))[1]["result"] is True
    assert portal.comment_bindings(comment) == [("contact", contact), ("lead", lead)]


async def test_a_filter_on_an_unknown_field_is_dropped_and_the_list_comes_back_unfiltered(
        portal: FakePortal, session: aiohttp.ClientSession) -> None:
    lead = portal.add_lead()
    mine, others = portal.add_contact("Ann", lead_id=lead), [portal.add_contact("Bob"), portal.add_contact("Cy")]
    status, body = await call(session, portal, "crm.contact.list", {"filter": {"LEAD_ID": lead}})
    assert [int(r["ID"]) for r in body["result"]] == [mine]
    status, body = await call(session, portal, "crm.contact.list", {"filter": {"LEADID": lead}})  # misspelt
    assert [int(r["ID"]) for r in body["result"]] == sorted([mine, *others])


async def test_a_page_past_the_end_is_the_first_page_again(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    leads = [portal.add_lead() for _ in range(3)]
    status, body = await call(session, portal, "crm.lead.list", {"start": 50})
    assert [int(r["ID"]) for r in body["result"]] == leads and body["total"] == 3


async def test_event_methods_are_global_scope_and_refuse_webhooks_and_non_admins(
        portal: FakePortal, session: aiohttp.ClientSession) -> None:
    portal.scopes = ["crm"]
    status, body = await call(session, portal, "method.get", {"name": "event.offline.list"})
    assert body["result"] == {"isExisting": True, "isAvailable": True}  # whoever asks
    status, body = await call(session, portal, "event.offline.list", {})
    assert (status, body["error"]) == (401, "WRONG_AUTH_TYPE")
    auth = portal.install_app()
    async with session.post(f"{portal.base_url}/rest/event.offline.list", json={"auth": auth["access_token"]}) as r:
        assert r.status == 200 and (await r.json())["result"] == []
    portal.admin = False
    async with session.post(f"{portal.base_url}/rest/event.offline.list", json={"auth": auth["access_token"]}) as r:
        assert (r.status, (await r.json())["error"]) == (403, "ACCESS_DENIED")


async def test_move_within_type_and_across_types(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    lead, other_lead = portal.add_lead(), portal.add_lead()
    company = portal.add_company("Acme")
    activity = portal.add_activity([(LEAD, lead)])
    move = {
        "activityId": activity,
        "sourceEntityTypeId": LEAD,
        "sourceEntityId": lead,
        "targetEntityTypeId": LEAD,
        "targetEntityId": other_lead,
    }
    assert (await call(session, portal, "crm.activity.binding.move", move))[1]["result"] is True
    assert portal.bindings(activity) == [(LEAD, other_lead)]
    assert portal.activities[activity]["OWNER_ID"] == str(other_lead)

    across = {**move, "sourceEntityId": other_lead, "targetEntityTypeId": COMPANY, "targetEntityId": company}
    status, body = await call(session, portal, "crm.activity.binding.move", across)
    assert (status, body) == (
        400,
        {"error": "", "error_description": "Source and target entity types are not equal"},
    )
    # The ID check comes first: lead 1 -> company 1 is reported as "equal IDs".
    same_id = {**across, "targetEntityId": other_lead}
    status, body = await call(session, portal, "crm.activity.binding.move", same_id)
    assert (status, body) == (
        400,
        {"error": "", "error_description": "Source and target entity ID cannot be equal"},
    )
    status, body = await call(
        session, portal, "crm.activity.binding.move", {**move, "targetEntityId": lead + 50}
    )
    assert (status, body["error"]) == (400, "BINDING_NOT_FOUND")


async def test_bindings_filter_finds_non_owner_bindings(
    portal: FakePortal, session: aiohttp.ClientSession
) -> None:
    lead, contact = portal.add_lead(), portal.add_contact("Ann")
    deal = portal.add_deal()
    by_contact = portal.add_activity([(LEAD, lead), (CONTACT, contact), (DEAL, deal)])  # the deal owns it
    portal.add_activity([(CONTACT, contact)])
    params = {"filter": {"BINDINGS": [{"OWNER_TYPE_ID": "1", "OWNER_ID": lead}]}}
    status, body = await call(session, portal, "crm.activity.list", params)
    assert [row["ID"] for row in body["result"]] == [str(by_contact)]
    status, body = await call(
        session, portal, "crm.activity.list", {"filter": {"OWNER_TYPE_ID": 1, "OWNER_ID": lead}}
    )
    assert body["result"] == []


async def test_timeline_comments_and_bindings(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    lead, contact = portal.add_lead(), portal.add_contact("Ann")
    comment = portal.add_timeline_comment("lead", lead, "called back")
    fields = {"OWNER_ID": comment, "ENTITY_ID": contact, "ENTITY_TYPE": "contact"}
    assert (await call(session, portal, "crm.timeline.bindings.bind", {"fields": fields}))[1][
        "result"
    ] is True
    status, body = await call(
        session, portal, "crm.timeline.bindings.list", {"filter": {"OWNER_ID": comment}}
    )
    assert body["result"] == [
        {"OWNER_ID": str(comment), "ENTITY_ID": str(contact), "ENTITY_TYPE": "contact"},
        {"OWNER_ID": str(comment), "ENTITY_ID": str(lead), "ENTITY_TYPE": "lead"},
    ]
    assert body["total"] == 2
    status, body = await call(
        session,
        portal,
        "crm.timeline.comment.list",
        {"filter": {"ENTITY_ID": contact, "ENTITY_TYPE": "contact"}},
    )
    assert [row["COMMENT"] for row in body["result"]] == ["called back"]
    status, body = await call(
        session, portal, "crm.timeline.comment.list", {"filter": {"ENTITY_TYPE": "lead"}}
    )
    assert (status, body["error"]) == (400, "")

    lead_fields = {**fields, "ENTITY_ID": lead, "ENTITY_TYPE": "lead"}
    assert (await call(session, portal, "crm.timeline.bindings.unbind", {"fields": lead_fields}))[1]["result"]
    assert portal.comment_bindings(comment) == [("contact", contact)]
    status, body = await call(session, portal, "crm.timeline.bindings.unbind", {"fields": lead_fields})
    assert (status, body) == (400, {"error": "", "error_description": "Not found."})
    status, body = await call(
        session, portal, "crm.timeline.bindings.bind", {"fields": {**fields, "OWNER_ID": 99}}
    )
    assert (status, body["result"]) == (200, False)  # a missing comment: false, no error (restservice.php)


async def test_add_and_update_over_http(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    status, body = await call(session, portal, "crm.lead.add", {"fields": {"TITLE": "From web"}})
    lead = body["result"]
    status, body = await call(
        session,
        portal,
        "crm.activity.add",
        {
            "fields": {
                "OWNER_TYPE_ID": 1,
                "OWNER_ID": lead,
                "SUBJECT": "Hi",
                "COMMUNICATIONS": [{"VALUE": "a@b.c"}],
            }
        },
    )
    activity = body["result"]
    assert portal.bindings(activity) == [(LEAD, lead)]
    status, body = await call(session, portal, "crm.activity.get", {"id": activity})
    assert "COMMUNICATIONS" not in body["result"]  # only a list that selects them returns them
    status, body = await call(session, portal, "crm.activity.list",
                              {"filter": {"ID": activity}, "select": ["ID", "COMMUNICATIONS"]})
    assert body["result"][0]["COMMUNICATIONS"] == [{"TYPE": "EMAIL", "VALUE": "a@b.c"}]
    status, body = await call(session, portal, "crm.activity.get", {"id": 999})
    assert (status, body["error_description"]) == (400, "Activity is not found")
    before = portal.leads[lead]["DATE_MODIFY"]
    await call(session, portal, "crm.lead.update", {"id": lead, "fields": {"STATUS_ID": "JUNK"}})
    assert portal.leads[lead]["STATUS_SEMANTIC_ID"] == "F"
    status, body = await call(session, portal, "crm.lead.list", {"filter": {">=DATE_MODIFY": before}})
    assert [row["ID"] for row in body["result"]] == [str(lead)]
    status, body = await call(session, portal, "crm.contact.get", {"id": 5})
    assert (status, body) == (400, {"error": "", "error_description": "Not found"})


async def test_missing_records_answer_not_found_without_a_code(
    portal: FakePortal, session: aiohttp.ClientSession
) -> None:
    for method in ("crm.lead.get", "crm.contact.get", "crm.company.get", "crm.deal.get"):
        assert await call(session, portal, method, {"id": 77}) == (
            400, {"error": "", "error_description": "Not found"})
    status, body = await call(session, portal, "crm.activity.get", {"id": 77})
    assert body == {"error": "", "error_description": "Activity is not found"}


async def test_move_checks_already_bound_before_the_source(
    portal: FakePortal, session: aiohttp.ClientSession
) -> None:
    lead, other = portal.add_lead(), portal.add_lead()
    activity = portal.add_activity([(LEAD, other)])
    move = {"activityId": activity, "sourceEntityTypeId": LEAD, "sourceEntityId": lead,
            "targetEntityTypeId": LEAD, "targetEntityId": other}
    status, body = await call(session, portal, "crm.activity.binding.move", move)
    assert body["error"] == "ACTIVITY_IS_ALREADY_BOUND"  # although the source binding does not exist
    # Equal ids are checked first, even before the activity is looked for.
    status, body = await call(session, portal, "crm.activity.binding.move",
                              {**move, "activityId": 999, "targetEntityId": lead})
    assert body == {"error": "", "error_description": "Source and target entity ID cannot be equal"}


async def test_bindings_of_any_type_are_kept_and_listed(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    lead = portal.add_lead()
    spa, invoice = portal.add_item(1038, "Project"), portal.add_item(SMART_INVOICE)
    activity = portal.add_activity([(LEAD, lead), (1038, spa)])
    status, body = await call(session, portal, "crm.activity.binding.add",
                              {"activityId": activity, "entityTypeId": SMART_INVOICE, "entityId": invoice})
    assert body["result"] is True
    status, body = await call(session, portal, "crm.activity.binding.list", {"activityId": activity})
    assert body["result"] == [{"entityTypeId": LEAD, "entityId": lead}, {"entityTypeId": 1038, "entityId": spa},
                              {"entityTypeId": SMART_INVOICE, "entityId": invoice}]
    assert portal.activities[activity]["OWNER_TYPE_ID"] == str(SMART_INVOICE)
    assert portal.violations == []


async def test_doctor_methods(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    assert (await call(session, portal, "scope"))[1]["result"] == ["crm", "user_brief"]
    assert (await call(session, portal, "crm.settings.mode.get"))[1]["result"] == 1
    status, body = await call(session, portal, "method.get", {"name": "crm.activity.binding.move"})
    assert body["result"] == {"isExisting": True, "isAvailable": True}
    portal.remove_method("crm.activity.binding.move")
    status, body = await call(session, portal, "method.get", {"name": "crm.activity.binding.move"})
    assert body["result"]["isExisting"] is False
