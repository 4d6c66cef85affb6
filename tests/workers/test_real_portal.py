"""The service against a portal that behaves as Bitrix24's CRM source does (protocol notes, section 0):
real Redis, the real worker, the fake portal over HTTP. The `portal` fixture asserts after each test that
no activity was ever bound to a record that does not exist."""
from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from arq import Worker

from app.fakeportal import COMPANY, CONTACT, DEAL, LEAD, FakePortal
from app.rules.facts import bindings_text
from app.web import create_app
from tests.conftest import post_event, rules_with

SMART_PROCESS = 1038  # a smart process's entityTypeId (128+ and 1030+ on real portals)

MATCHED_RULES = """
rules:
  - name: known-client-emails-go-to-the-client
    on: [ONCRMACTIVITYADD]
    when: {bound_to: lead, kind: email, not: {lead_status: converted}}
    do:
      - bind: [matched.contact, matched.company]
      - unbind: lead
"""


async def job(client: TestClient, answer: dict[str, Any]) -> dict[str, Any]:
    return await (await client.get(f"/api/jobs/{answer['job_id']}")).json()  # type: ignore[no-any-return]


async def send_portal_events(client: TestClient, portal: FakePortal, since: int = 0) -> list[dict[str, Any]]:
    """Post what the portal recorded since `since`, in its order, as its outbound webhook would."""
    answers = []
    for event, entity_id in portal.events[since:]:
        status, answer = await post_event(client, event, entity_id)
        assert status == 200, answer
        answers.append(answer)
    return answers


@pytest.mark.slow
async def test_a_portal_made_conversion_of_1000_activities_writes_only_unbinds(
        client: TestClient, worker: Worker, portal: FakePortal) -> None:
    lead = portal.add_lead("Big client")
    activities = [portal.add_activity([(LEAD, lead)], subject=f"mail {i}") for i in range(1000)]
    mark = len(portal.events)
    made = portal.convert_lead(lead)
    portal.reset_counters()
    portal.method_calls.clear()

    *_, answer = await send_portal_events(client, portal, mark)  # company, contact, then the lead's update
    await worker.run_check()

    assert all(portal.bindings(a) == [(CONTACT, made["contact"]), (COMPANY, made["company"])] for a in activities)
    # The conversion attached them: the service only removes the lead binding.
    assert portal.method_calls["crm.activity.binding.add"] == 0
    assert portal.method_calls["crm.activity.binding.delete"] == 1000
    # Near the floor: facts and the first page (1), the other 19 pages, 20 batches of binding reads,
    # 20 of unbinds; the company and contact events find the lead's job already done or queued.
    lead_job = await job(client, answer)
    assert lead_job["state"] == "succeeded", lead_job
    assert lead_job["requests"] <= 1 + 19 + 20 + 20, lead_job["requests"]


async def test_late_emails_on_a_converted_lead_follow_the_client(
        client: TestClient, worker: Worker, portal: FakePortal) -> None:
    lead = portal.add_lead("Ann", email="ann@example.com")
    portal.add_activity([(LEAD, lead)])
    made = portal.convert_lead(lead)
    await send_portal_events(client, portal)
    await worker.run_check()
    mark = len(portal.events)
    late = [portal.add_activity([(LEAD, lead)], subject=f"Re: offer {i}") for i in range(3)]  # bound to the lead only

    answers = await send_portal_events(client, portal, mark)
    await worker.run_check()

    for activity in late:
        assert portal.bindings(activity) == [(CONTACT, made["contact"]), (COMPANY, made["company"])]
    assert [(await job(client, a))["state"] for a in answers] == ["succeeded"] * 3


async def test_a_repeat_lead_of_a_known_client_brings_its_history_to_the_client(
        client: TestClient, worker: Worker, portal: FakePortal) -> None:
    company = portal.add_company("Acme")
    contact = portal.add_contact("Ann", company_id=company)
    lead = portal.add_lead("Ann again", contact_id=contact, company_id=company)
    activity = portal.add_activity([(LEAD, lead)], subject="new order")
    mark = len(portal.events)
    made = portal.convert_lead(lead)  # the portal makes only a deal, and attaches only that
    assert portal.bindings(activity) == [(LEAD, lead), (DEAL, made["deal"])]

    await send_portal_events(client, portal, mark)
    await worker.run_check()

    assert portal.bindings(activity) == [(DEAL, made["deal"]), (CONTACT, contact), (COMPANY, company)]


async def test_a_conversion_over_rest_attaches_nothing_so_the_service_binds(
        client: TestClient, worker: Worker, portal: FakePortal) -> None:
    lead = portal.add_lead("Ann")
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(3)]
    mark = len(portal.events)
    contact = portal.convert_lead_over_rest(lead)

    await send_portal_events(client, portal, mark)
    await worker.run_check()

    assert all(portal.bindings(a) == [(CONTACT, contact)] for a in activities)


async def test_a_known_clients_email_on_a_fresh_lead_goes_to_the_client(
        aiohttp_client: Any, settings: Any, portal_config: Any, make_worker: Any, portal: FakePortal) -> None:
    rules = rules_with(MATCHED_RULES, portal_config)
    client = await aiohttp_client(create_app(settings, rules))
    company = portal.add_company("Acme")
    contact = portal.add_contact("Ann", email="ann@acme.test", company_id=company)
    lead = portal.add_lead("Web form")
    activity = portal.add_activity([(LEAD, lead)], email="ANN@acme.test")

    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    await make_worker(rules=rules).run_check()

    assert portal.bindings(activity) == [(CONTACT, contact)], await job(client, answer)
    assert portal.method_calls["crm.activity.get"] == 0  # it has no COMMUNICATIONS: the list is read


async def test_an_address_past_the_twentieth_is_still_searched(
        aiohttp_client: Any, settings: Any, portal_config: Any, make_worker: Any, portal: FakePortal) -> None:
    rules = rules_with(MATCHED_RULES, portal_config)
    client = await aiohttp_client(create_app(settings, rules))
    contact = portal.add_contact("Ann", email="ann@acme.test")
    lead = portal.add_lead("Mailing list reply")
    activity = portal.add_activity([(LEAD, lead)])
    portal.activities[activity]["COMMUNICATIONS"] = (
        [{"TYPE": "EMAIL", "VALUE": f"someone{i}@elsewhere.test"} for i in range(24)]
        + [{"TYPE": "EMAIL", "VALUE": "ann@acme.test"}])

    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    await make_worker(rules=rules).run_check()

    # The portal looks at 20 values a call: the 25th address is found only because the search was split.
    assert portal.bindings(activity) == [(CONTACT, contact)], await job(client, answer)


async def test_a_contact_deleted_between_read_and_write_is_left_out(
        client: TestClient, worker: Worker, portal: FakePortal) -> None:
    lead = portal.add_lead("Ann")
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)], subject="late mail")
    # Someone deletes the contact after the job read the lead, before it writes.
    portal.before_request("crm.activity.binding.delete", lambda: portal.delete_entity(CONTACT, made["contact"]))

    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    await worker.run_check()

    assert portal.bindings(activity) == [(COMPANY, made["company"])]
    record = await job(client, answer)
    assert record["state"] == "succeeded", record
    assert f"contact {made['contact']}" in record["outcome"] and "deleted" in record["outcome"]
    assert portal.check_invariants() == []


async def test_every_target_deleted_keeps_the_lead_binding(
        client: TestClient, worker: Worker, portal: FakePortal) -> None:
    lead = portal.add_lead("Ann")
    made = portal.convert_lead_over_rest(lead)
    activity = portal.add_activity([(LEAD, lead)])
    portal.before_request("crm.activity.binding.delete", lambda: portal.delete_entity(CONTACT, made))

    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    await worker.run_check()

    assert portal.bindings(activity) == [(LEAD, lead)]  # never bound to nothing real
    record = await job(client, answer)
    assert record["state"] == "skipped" and f"contact {made}" in record["outcome"], record


async def test_a_smart_process_binding_is_kept_and_counts(
        client: TestClient, worker: Worker, portal: FakePortal) -> None:
    lead = portal.add_lead("Ann")
    project = portal.add_item(SMART_PROCESS, "Fit-out project")
    activity = portal.add_activity([(LEAD, lead), (SMART_PROCESS, project)])
    made = portal.convert_lead(lead)

    _, answer = await post_event(client, "ONCRMLEADUPDATE", lead)
    await worker.run_check()

    assert portal.bindings(activity) == sorted([(SMART_PROCESS, project), (CONTACT, made["contact"]),
                                                (COMPANY, made["company"])])
    record = await job(client, answer)
    assert "type1038 1" in bindings_text(record["plan"][0]["after"]), record["plan"]


@pytest.mark.parametrize("event, what", [("ONCRMACTIVITYADD", "activity"), ("ONCRMLEADUPDATE", "lead"),
                                         ("ONCRMCONTACTADD", "contact")])
async def test_a_record_gone_before_the_job_ends_it_as_nothing_to_do(
        client: TestClient, worker: Worker, portal: FakePortal, event: str, what: str) -> None:
    _, answer = await post_event(client, event, 4242)
    await worker.run_check()

    record = await job(client, answer)
    assert record["state"] == "skipped", record
    assert f"{what} 4242 no longer exists" in record["outcome"]


async def test_a_portal_in_simple_crm_mode_says_lead_rules_can_never_fire(
        client: TestClient, worker: Worker, portal: FakePortal) -> None:
    portal.crm_mode = 2  # no leads: a lead becomes a deal at once and cannot be read
    _, answer = await post_event(client, "ONCRMLEADUPDATE", 77)
    await worker.run_check()

    record = await job(client, answer)
    assert record["state"] == "skipped"
    assert "simple CRM mode" in record["outcome"] and "converted-lead-history-follows-client" in record["outcome"]
    ready = await (await client.get("/readyz")).json()
    assert ready["status"] == "ready"
    assert ready["warnings"] == [record["outcome"].split("; ", 1)[1]]
    # Learnt once: the next gone lead costs no extra read of the mode.
    calls = portal.method_calls["crm.settings.mode.get"]
    _, answer = await post_event(client, "ONCRMLEADUPDATE", 78)
    await worker.run_check()
    assert portal.method_calls["crm.settings.mode.get"] == calls == 1


async def test_a_classic_portal_has_no_warning(client: TestClient, worker: Worker, portal: FakePortal) -> None:
    _, answer = await post_event(client, "ONCRMLEADUPDATE", 77)
    await worker.run_check()

    assert (await job(client, answer))["outcome"] == "lead 77 no longer exists in the portal"
    assert "warnings" not in await (await client.get("/readyz")).json()


COMMENT_RULES = """
rules:
  - name: history-follows-client
    on: [ONCRMLEADUPDATE]
    when: {bound_to: lead, lead_status: converted}
    do:
      - bind: [lead.contact, lead.company]
      - unbind: lead
      - timeline_comments: follow
"""


async def test_every_page_of_timeline_comments_follows(
        aiohttp_client: Any, settings: Any, portal_config: Any, make_worker: Any, portal: FakePortal) -> None:
    rules = rules_with(COMMENT_RULES, portal_config)
    client = await aiohttp_client(create_app(settings, rules))
    lead = portal.add_lead("Ann")
    portal.add_activity([(LEAD, lead)])
    comments = [portal.add_timeline_comment("lead", lead, f"note {i}") for i in range(120)]  # three pages
    made = portal.convert_lead(lead)  # the portal copies them and keeps the lead binding

    _, answer = await post_event(client, "ONCRMLEADUPDATE", lead)
    await make_worker(rules=rules).run_check()

    assert (await job(client, answer))["state"] == "succeeded"
    assert all(portal.comment_bindings(c) == sorted([("company", made["company"]), ("contact", made["contact"])])
               for c in comments)


@pytest.mark.parametrize("why", ["no rights on the contact", "the save fails"])
async def test_timeline_binds_answered_false_stop_the_comment_and_keep_the_lead(
        aiohttp_client: Any, settings: Any, portal_config: Any, make_worker: Any, portal: FakePortal,
        why: str) -> None:
    rules = rules_with(COMMENT_RULES, portal_config)
    client = await aiohttp_client(create_app(settings, rules))
    lead = portal.add_lead("Ann")
    comment = portal.add_timeline_comment("lead", lead, "called back")
    contact = portal.convert_lead_over_rest(lead)  # nothing attached: the service binds the comment
    if why == "the save fails":
        portal.timeline_saves_fail = True
    else:
        portal.set_access_denied({(CONTACT, contact)})  # crm.timeline.bindings.bind: false, no error

    _, answer = await post_event(client, "ONCRMLEADUPDATE", lead)
    await make_worker(rules=rules).run_check()

    assert portal.comment_bindings(comment) == [("lead", lead)]  # the unbind never went
    assert portal.method_calls["crm.timeline.bindings.unbind"] == 0
    record = await job(client, answer)
    assert record["state"] == "failed", record
    assert record["error"]["code"] == "WRITE_NOT_CONFIRMED" and "CRM rights" in record["error"]["what_to_do"]


async def test_a_list_whose_filter_the_portal_drops_stops_the_job_before_any_write(
        client: TestClient, worker: Worker, portal: FakePortal) -> None:
    # A portal version without LEAD_ID in the contact's field list drops that filter: the whole table.
    portal.list_fields["contact"].discard("LEAD_ID")
    portal.add_contact("Someone else entirely")
    leads = [portal.add_lead(name) for name in ("Ann", "Bob")]
    activities = [portal.add_activity([(LEAD, lead)]) for lead in leads]
    for lead in leads:
        portal.convert_lead_over_rest(lead)
    portal.method_calls.clear()

    answers = [(await post_event(client, "ONCRMLEADUPDATE", lead))[1] for lead in leads]  # merged: @LEAD_ID
    await worker.run_check()

    for answer in answers:
        record = await job(client, answer)
        assert record["state"] == "failed" and record["error"]["code"] == "LIST_NOT_FILTERED", record
    assert not [m for m in portal.method_calls if m.startswith("crm.activity.binding.") and m.endswith(
        ("add", "delete", "move"))], portal.method_calls
    assert [portal.bindings(a) for a in activities] == [[(LEAD, lead)] for lead in leads]


async def test_an_activity_deleted_between_read_and_write_is_nothing_to_do(
        client: TestClient, worker: Worker, portal: FakePortal) -> None:
    lead = portal.add_lead("Ann")
    portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    portal.before_request("crm.activity.binding.delete", lambda: portal.delete_activity(activity))

    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    await worker.run_check()

    record = await job(client, answer)
    assert record["state"] == "skipped", record
    assert record["outcome"] == "1 item deleted since read: nothing to do for it"
    assert [change["status"] for change in record["changes"]] == ["gone"]


async def test_a_webhook_user_without_rights_on_the_client_leaves_the_activity_as_it_was(
        client: TestClient, worker: Worker, portal: FakePortal) -> None:
    lead = portal.add_lead("Ann")
    made = portal.convert_lead_over_rest(lead)
    activity = portal.add_activity([(LEAD, lead)])
    portal.set_access_denied({(CONTACT, made)})  # the webhook's user may not change this contact

    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    await worker.run_check()

    assert portal.bindings(activity) == [(LEAD, lead)]  # bind refused, so the lead binding stays
    record = await job(client, answer)
    assert record["state"] == "failed", record
    assert record["error"]["code"] == "ACCESS_DENIED" and "CRM rights" in record["error"]["what_to_do"]


def crowded_activity(portal: FakePortal, lead: int, others: int) -> tuple[int, list[tuple[int, int]]]:
    """An activity bound to the lead and to `others` smart-process items (whose ids are the lowest of
    the activity's owners but one: a save past 100 would drop one of them first)."""
    activity = portal.add_activity([(LEAD, lead)], subject="to the whole project team")
    for n in range(others):
        portal.bind_by_hand(activity, (SMART_PROCESS, portal.add_item(SMART_PROCESS, f"project {n}")))
    return activity, portal.bindings(activity)


BIND_AND_UNBIND = "[{bind: [lead.contact, lead.company]}, {unbind: lead}]"


@pytest.mark.parametrize("blind", [True, False])  # bindings assumed from a lead's sample, or read
async def test_a_99_binding_activity_is_bound_and_unbound_in_turn_and_loses_nothing(
        aiohttp_client: Any, settings: Any, portal_config: Any, make_worker: Any, portal: FakePortal,
        blind: bool) -> None:
    lead = portal.add_lead("Ann")
    plain = [portal.add_activity([(LEAD, lead)]) for _ in range(2)]  # a lead's sample: bound to the lead only
    activity, found = crowded_activity(portal, lead, 98)  # 99 bindings with the lead's
    contact = portal.convert_lead_over_rest(lead)  # nothing attached: the service binds
    company = portal.add_company("Acme")
    portal.update_lead(lead, COMPANY_ID=company)
    rules = rules_with(rule_text(BIND_AND_UNBIND, "ONCRMLEADUPDATE" if blind else "ONCRMACTIVITYADD"), portal_config)
    client = await aiohttp_client(create_app(settings, rules))

    _, answer = await post_event(client, "ONCRMLEADUPDATE" if blind else "ONCRMACTIVITYADD",
                                 lead if blind else activity)
    await make_worker(rules=rules).run_check()

    # Add the contact (100), unbind the lead (99), add the company (100): the count never passed 100,
    # so the portal dropped nothing (the `portal` fixture fails on any binding a write of ours lost).
    assert portal.bindings(activity) == sorted([*found[1:], (CONTACT, contact), (COMPANY, company)])
    record = await job(client, answer)
    assert record["state"] == "succeeded", record
    if blind:
        assert all(portal.bindings(a) == [(CONTACT, contact), (COMPANY, company)] for a in plain)
    writes = [h for h in portal.binding_history[activity] if len(h) >= 99]
    assert max(len(h) for h in writes) == 100


@pytest.mark.parametrize("do,others", [
    (BIND_AND_UNBIND, 99),  # 100 already, and the plan ends at 101
    ("[{bind: [lead.contact, lead.company]}]", 98),  # 99 + 2: 101
])
async def test_an_activity_the_plan_cannot_fit_under_100_is_left_as_found_and_the_job_says_so(
        aiohttp_client: Any, settings: Any, portal_config: Any, make_worker: Any, portal: FakePortal,
        do: str, others: int) -> None:
    lead = portal.add_lead("Ann")
    plain = [portal.add_activity([(LEAD, lead)]) for _ in range(2)]
    activity, found = crowded_activity(portal, lead, others)
    contact = portal.convert_lead_over_rest(lead)
    company = portal.add_company("Acme")
    portal.update_lead(lead, COMPANY_ID=company)
    rules = rules_with(rule_text(do, "ONCRMLEADUPDATE"), portal_config)
    client = await aiohttp_client(create_app(settings, rules))

    _, answer = await post_event(client, "ONCRMLEADUPDATE", lead)  # the sample says "lead only": adds blind
    await make_worker(rules=rules).run_check()

    assert portal.bindings(activity) == found
    assert all((CONTACT, contact) in portal.bindings(a) for a in plain)
    record = await job(client, answer)
    assert record["state"] == "succeeded", record
    assert "1 item kept as found" in record["outcome"], record["outcome"]
    [change] = [c for c in record["changes"] if c["activity"] == activity]
    assert change["status"] == "kept" and change["errors"][0]["code"] == "BINDINGS_FULL", change


async def test_a_move_on_a_100_binding_activity_loses_nothing(
        aiohttp_client: Any, settings: Any, portal_config: Any, make_worker: Any, portal: FakePortal) -> None:
    old, new = portal.add_company("Old Ltd"), portal.add_company("New Ltd")
    contact = portal.add_contact("Ann", company_id=new)
    activity = portal.add_activity([(COMPANY, old), (CONTACT, contact)])
    for n in range(98):
        portal.bind_by_hand(activity, (SMART_PROCESS, portal.add_item(SMART_PROCESS, f"project {n}")))
    rules = rules_with(rule_text("[{move: {from: company, to: contact.company}}]", "ONCRMACTIVITYADD",
                                 "{bound_to: contact}"), portal_config)
    client = await aiohttp_client(create_app(settings, rules))

    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    await make_worker(rules=rules).run_check()

    assert (COMPANY, new) in portal.bindings(activity) and (COMPANY, old) not in portal.bindings(activity)
    assert len(portal.bindings(activity)) == 100
    assert (await job(client, answer))["state"] == "succeeded"


def rule_text(do: str, on: str, when: str = "{bound_to: lead}") -> str:
    return f"rules:\n  - name: r\n    on: [{on}]\n    when: {when}\n    do: {do}\n"
