"""FakePortal over real HTTP: the envelopes, errors and limits the service relies on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from app.fakeportal import COMPANY, CONTACT, DEAL, LEAD, SMART_INVOICE, FakePortal, parse_php_query


@pytest.fixture
async def portal() -> AsyncIterator[FakePortal]:
    fake = FakePortal(per_second=None)
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def call(
    session: aiohttp.ClientSession, portal: FakePortal, method: str, params: dict[str, Any] | None = None
) -> tuple[int, Any]:
    async with session.post(portal.rest_url + method, json=params or {}) as response:
        return response.status, await response.json()


async def test_wrong_webhook_code_is_401(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    url = f"{portal.base_url}/rest/1/wrong/crm.lead.get.json"
    async with session.post(url, json={"id": 1}) as response:
        assert response.status == 401
        assert await response.json() == {
            "error": "NO_AUTH_FOUND",
            "error_description": "Wrong authorization data",
        }
    assert portal.request_count == 0


async def test_unknown_method_is_404(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    status, body = await call(session, portal, "crm.nothing.here")
    assert (status, body["error"]) == (404, "ERROR_METHOD_NOT_FOUND")


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


async def test_binding_cap_of_100(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    leads = [portal.add_lead() for _ in range(101)]
    activity = portal.add_activity([(LEAD, lead) for lead in leads[:100]])
    status, body = await call(
        session,
        portal,
        "crm.activity.binding.add",
        {"activityId": activity, "entityTypeId": LEAD, "entityId": leads[100]},
    )
    assert (status, body["error"]) == (400, "TOO_MANY_BINDINGS")
    assert len(portal.bindings(activity)) == 100


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


async def test_batch_results_errors_and_one_request(
    portal: FakePortal, session: aiohttp.ClientSession
) -> None:
    lead = portal.add_lead()
    contact = portal.add_contact("Ann", lead_id=lead)
    activity = portal.add_activity([(LEAD, lead)])
    cmd = {
        "add": f"crm.activity.binding.add?activityId={activity}&entityTypeId=3&entityId={contact}",
        "again": f"crm.activity.binding.add?activityId={activity}&entityTypeId=3&entityId={contact}",
        "list": "crm.activity.list?filter[BINDINGS][0][OWNER_TYPE_ID]=1"
        f"&filter[BINDINGS][0][OWNER_ID]={lead}",
        "nested": "batch?cmd[x]=crm.lead.get%3Fid%3D1",
    }
    portal.reset_counters()
    status, body = await call(session, portal, "batch", {"halt": 0, "cmd": cmd})
    assert status == 200
    result = body["result"]
    assert list(result["result"]) == ["add", "list"]
    assert result["result"]["add"] is True
    assert [row["ID"] for row in result["result"]["list"]] == [str(activity)]
    assert result["result_total"] == {"list": 1}
    assert result["result_next"] == []
    assert result["result_error"]["again"]["error"] == "ACTIVITY_IS_ALREADY_BOUND"
    assert result["result_error"]["nested"]["error"] == "ERROR_BATCH_METHOD_NOT_ALLOWED"
    assert portal.requests == [("batch", 4)]

    status, body = await call(session, portal, "batch", {"cmd": {"a": f"crm.lead.get?id={lead}"}})
    assert body["result"]["result_error"] == [] and body["result"]["result_total"] == []


async def test_batch_halt_and_length_limit(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    lead = portal.add_lead()
    cmd = {"bad": "crm.lead.get?id=999", "good": f"crm.lead.get?id={lead}"}
    status, body = await call(session, portal, "batch", {"halt": 1, "cmd": cmd})
    assert list(body["result"]["result_error"]) == ["bad"] and body["result"]["result"] == []

    too_many = {f"c{i}": f"crm.lead.get?id={lead}" for i in range(53)}
    status, body = await call(session, portal, "batch", {"cmd": too_many})
    # The first 50 run; each one past them is refused, the call itself answers 200.
    assert status == 200
    assert list(body["result"]["result"]) == [f"c{i}" for i in range(50)]
    assert {key: error["error"] for key, error in body["result"]["result_error"].items()} == {
        "c50": "ERROR_BATCH_LENGTH_EXCEEDED", "c51": "ERROR_BATCH_LENGTH_EXCEEDED", "c52": "ERROR_BATCH_LENGTH_EXCEEDED"}


async def test_list_paging_and_fast_form(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    lead = portal.add_lead()
    for _ in range(120):
        portal.add_activity([(LEAD, lead)])
    status, body = await call(session, portal, "crm.activity.list", {"order": {"ID": "ASC"}})
    assert (len(body["result"]), body["total"], body["next"]) == (50, 120, 50)
    status, body = await call(session, portal, "crm.activity.list", {"start": 100})
    assert (len(body["result"]), body["total"], "next" in body) == (20, 120, False)
    status, body = await call(
        session, portal, "crm.activity.list", {"filter": {">ID": "100"}, "order": {"ID": "ASC"}, "start": -1}
    )
    assert [row["ID"] for row in body["result"]] == [str(i) for i in range(101, 121)]
    assert body["total"] == 0 and "next" not in body  # no COUNT: the total a portal may send is 0
    status, body = await call(session, portal, "crm.activity.list", {"order": {"ID": "DESC"}, "start": -1})
    assert body["result"][0]["ID"] == "120"


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


async def test_convert_lead_creates_entities(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    lead = portal.add_lead("Website order", name="Ann", email="ann@example.com")
    activity = portal.add_activity([(LEAD, lead)])
    created = portal.convert_lead(lead, deal=True)
    # The portal copies: every created record gets a binding, the lead binding stays, and the deal
    # (the last binding that is not a contact or company) becomes the owner.
    assert portal.bindings(activity) == sorted([(LEAD, lead), (DEAL, created["deal"]),
                                                (CONTACT, created["contact"]), (COMPANY, created["company"])])
    assert (portal.activities[activity]["OWNER_TYPE_ID"], portal.activities[activity]["OWNER_ID"]) == (
        str(DEAL), str(created["deal"]))
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


async def test_form_encoded_php_params(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    lead = portal.add_lead()
    contact = portal.add_contact("Ann")
    activity = portal.add_activity([(LEAD, lead)])
    form = {"activityId": str(activity), "entityTypeId": "3", "entityId": str(contact)}
    async with session.post(portal.rest_url + "crm.activity.binding.add", data=form) as response:
        assert (await response.json())["result"] is True
    query = (
        "filter[>ID]=0&filter[BINDINGS][0][OWNER_TYPE_ID]=3"
        f"&filter[BINDINGS][0][OWNER_ID]={contact}&select[]=ID"
    )
    async with session.get(portal.rest_url + "crm.activity.list.json?" + query) as response:
        assert [row["ID"] for row in (await response.json())["result"]] == [str(activity)]
    form = {"halt": "0", "cmd[one]": f"crm.activity.binding.list?activityId={activity}"}
    async with session.post(portal.rest_url + "batch", data=form) as response:
        assert len((await response.json())["result"]["result"]["one"]) == 2


def test_parse_php_query() -> None:
    pairs = [
        ("filter[>ID]", "5"),
        ("select[]", "ID"),
        ("select[]", "TITLE"),
        ("cmd[a]", "x?y=1"),
        ("plain", "v"),
    ]
    assert parse_php_query(pairs) == {
        "filter": {">ID": "5"},
        "select": ["ID", "TITLE"],
        "cmd": {"a": "x?y=1"},
        "plain": "v",
    }


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
    assert body == {"error": "", "error_description": "OWNER_ID is not defined or invalid."}


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


# ---------------------------------------------------------------- as a real portal behaves (protocol §0)


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


async def test_deleting_a_record_takes_its_bindings_and_is_not_a_violation(portal: FakePortal) -> None:
    lead, contact = portal.add_lead(), portal.add_contact()
    shared = portal.add_activity([(LEAD, lead), (CONTACT, contact)])
    only_contact = portal.add_activity([(CONTACT, contact)])
    portal.delete_entity(CONTACT, contact)
    assert portal.bindings(shared) == [(LEAD, lead)]
    assert only_contact not in portal.activities
    assert portal.check_invariants() == []


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


async def test_doctor_methods(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    assert (await call(session, portal, "scope"))[1]["result"] == ["crm", "user_brief"]
    assert (await call(session, portal, "crm.settings.mode.get"))[1]["result"] == 1
    status, body = await call(session, portal, "method.get", {"name": "crm.activity.binding.move"})
    assert body["result"] == {"isExisting": True, "isAvailable": True}
    portal.remove_method("crm.activity.binding.move")
    status, body = await call(session, portal, "method.get", {"name": "crm.activity.binding.move"})
    assert body["result"]["isExisting"] is False


async def test_a_lead_closing_completes_its_open_calls_and_todos(portal: FakePortal) -> None:
    lead = portal.add_lead()
    call, todo, email = (portal.add_activity([(LEAD, lead)], type_id=t) for t in (2, 6, 4))
    portal.events.clear()
    portal.convert_lead(lead, contact=True, company=False)
    assert portal.events[-2:] == [("ONCRMACTIVITYUPDATE", call), ("ONCRMACTIVITYUPDATE", todo)]
    assert [portal.activities[a]["COMPLETED"] for a in (call, todo, email)] == ["Y", "Y", "N"]


async def test_lists_return_the_selected_fields_and_multiple_ones_only_when_named(
        portal: FakePortal, session: aiohttp.ClientSession) -> None:
    portal.add_contact("Ann", email="ann@example.com")
    status, body = await call(session, portal, "crm.contact.list", {"select": ["NAME"]})
    assert body["result"] == [{"ID": "1", "NAME": "Ann"}]
    status, body = await call(session, portal, "crm.contact.list", {"select": ["*"]})
    assert "EMAIL" not in body["result"][0] and body["result"][0]["NAME"] == "Ann"
    status, body = await call(session, portal, "crm.contact.list", {"select": ["*", "EMAIL"]})
    assert body["result"][0]["EMAIL"][0]["VALUE"] == "ann@example.com"


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
