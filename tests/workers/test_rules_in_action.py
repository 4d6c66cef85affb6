"""Each condition, target and action of the rule language, over the fake portal with a real worker."""
from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from app.fakeportal import COMPANY, CONTACT, DEAL, LEAD, FakePortal
from app.rebind.echo import MAX_CHANGES_PER_WINDOW, ChangeLog
from app.rules.facts import bindings_text
from app.web import create_app
from tests.conftest import post_event, record_changes, rules_with


@pytest.fixture
def scenario(aiohttp_client: Any, settings: Any, portal_config: Any, make_worker: Any, redis: Any) -> Any:
    """Post one event under a given rules file, let a worker drain the queue, return the job record."""

    async def run(rules_text: str, event: str, entity_id: int, **kwargs: Any) -> dict[str, Any]:
        rules = rules_with(rules_text, portal_config)
        client: TestClient = await aiohttp_client(create_app(settings, rules))
        status, answer = await post_event(client, event, entity_id, **kwargs)
        assert status == 200, answer
        await make_worker(rules=rules).run_check()
        return await (await client.get(f"/api/jobs/{answer['job_id']}")).json()  # type: ignore[no-any-return]

    return run


def rule(when: str = "{}", do: str = "[{bind: [lead.contact]}, {unbind: lead}]", on: str = "ONCRMACTIVITYADD",
         extra: str = "") -> str:
    return f"rules:\n  - name: r\n    on: [{on}]\n    when: {when}\n    do: {do}\n{extra}"


def converted_lead_with(portal: FakePortal, **activity: Any) -> tuple[int, dict[str, Any], int]:
    lead = portal.add_lead()
    made = portal.convert_lead(lead, deal=True)
    return lead, made, portal.add_activity([(LEAD, lead)], **activity)


@pytest.mark.parametrize("when,activity,moves", [
    ("{kind: email}", {"type_id": 4, "provider_id": "CRM_EMAIL"}, True),
    ("{kind: email}", {"type_id": 2, "provider_id": "VOXIMPLANT_CALL"}, False),
    ("{kind: [call, meeting]}", {"type_id": 2, "provider_id": "VOXIMPLANT_CALL"}, True),
    ("{kind: todo}", {"type_id": 6, "provider_id": "CRM_TODO"}, True),
    ("{kind: VOXIMPLANT_CALL}", {"type_id": 2, "provider_id": "VOXIMPLANT_CALL"}, True),
    ("{direction: incoming}", {"direction": 1}, True),
    ("{direction: incoming}", {"direction": 2}, False),
    ("{responsible: [7, 8]}", {"responsible_id": 8}, True),
    ("{responsible: 7}", {"responsible_id": 1}, False),
    ("{subject_contains: INVOICE}", {"subject": "Re: invoice 42"}, True),
    ("{subject_matches: '^Re: '}", {"subject": "Fwd: hello"}, False),
    ("{portal: acme}", {}, True),
    ("{portal: other}", {}, False),
    ("{lead_status: CONVERTED}", {}, True),
    ("{lead_status: [NEW, JUNK]}", {}, False),
    ("{any: [{kind: call}, {subject_contains: urgent}]}", {"subject": "urgent!"}, True),
    ("{any: [{kind: call}, {subject_contains: urgent}]}", {"subject": "calm"}, False),
    ("{not: {subject_contains: private}}", {"subject": "private matter"}, False),
    ("{not: {subject_contains: private}}", {"subject": "public"}, True),
])
async def test_conditions(scenario: Any, portal: FakePortal, when: str, activity: dict[str, Any],
                          moves: bool) -> None:
    lead, made, activity_id = converted_lead_with(portal, **activity)

    job = await scenario(rule(when=when), "ONCRMACTIVITYADD", activity_id)

    expected = [(CONTACT, made["contact"])] if moves else [(LEAD, lead)]
    assert portal.bindings(activity_id) == expected, job
    assert job["state"] == ("succeeded" if moves else "skipped")


@pytest.mark.parametrize("target,expected", [
    ("lead.contact", lambda made: [(CONTACT, made["contact"])]),
    ("lead.company", lambda made: [(COMPANY, made["company"])]),
    ("lead.deal", lambda made: [(DEAL, made["deal"])]),
    ("{type: company, id: COMPANY}", lambda made: [(COMPANY, made["company"])]),
])
async def test_lead_targets_and_fixed_targets(scenario: Any, portal: FakePortal, target: str, expected: Any) -> None:
    lead, made, activity = converted_lead_with(portal)
    target = target.replace("COMPANY", str(made["company"]))

    await scenario(rule(do=f"[{{bind: [{target}]}}, {{unbind: lead}}]"), "ONCRMACTIVITYADD", activity)

    assert portal.bindings(activity) == expected(made)


async def test_contact_company_shows_a_contacts_activity_on_its_company(scenario: Any, portal: FakePortal) -> None:
    company = portal.add_company("Acme")
    contact = portal.add_contact("Ann", company_id=company)
    activity = portal.add_activity([(CONTACT, contact)])

    await scenario(rule(when="{bound_to: contact}", do="[{bind: [contact.company]}]"), "ONCRMACTIVITYADD", activity)

    assert portal.bindings(activity) == [(CONTACT, contact), (COMPANY, company)]


async def test_deal_contact_and_company(scenario: Any, portal: FakePortal) -> None:
    company, contact = portal.add_company("Acme"), portal.add_contact("Ann")
    deal = portal.add_deal("Chairs", contact_id=contact, company_id=company)
    activity = portal.add_activity([(DEAL, deal)])

    await scenario(rule(when="{bound_to: deal}", do="[{bind: [deal.contact, deal.company]}]"),
                   "ONCRMACTIVITYADD", activity)

    assert portal.bindings(activity) == [(DEAL, deal), (CONTACT, contact), (COMPANY, company)]


async def test_an_email_from_a_known_client_on_a_repeat_lead_goes_to_that_client(scenario: Any,
                                                                                 portal: FakePortal) -> None:
    company = portal.add_company("Acme", email="info@acme.test")
    contact = portal.add_contact("Ann", email="ann@acme.test", company_id=company)
    repeat_lead = portal.add_lead(title="Ann again")
    activity = portal.add_activity([(LEAD, repeat_lead)], email="Ann@Acme.test")

    job = await scenario(rule(when="{bound_to: lead, kind: email}",
                              do="[{bind: [matched.contact, matched.company]}, {unbind: lead}]"),
                         "ONCRMACTIVITYADD", activity)

    assert portal.bindings(activity) == [(CONTACT, contact)], job
    assert bindings_text(job["plan"][0]["after"]) == f"contact {contact}"


async def test_move_stays_within_one_type(scenario: Any, portal: FakePortal) -> None:
    old, new = portal.add_company("Old Ltd"), portal.add_company("New Ltd")
    contact = portal.add_contact("Ann", company_id=new)
    activity = portal.add_activity([(COMPANY, old), (CONTACT, contact)])
    portal.reset_counters()

    job = await scenario(rule(when="{bound_to: contact}", do="[{move: {from: company, to: contact.company}}]"),
                         "ONCRMACTIVITYADD", activity)

    assert portal.bindings(activity) == [(CONTACT, contact), (COMPANY, new)]
    assert job["plan"][0]["move"] == [{"from": {"entity_type": COMPANY, "entity_id": old},
                                       "to": {"entity_type": COMPANY, "entity_id": new}}]
    assert len(portal.binding_history[activity]) == 2, "one move, not an add and a delete"


async def test_timeline_comments_follow_the_lead(scenario: Any, portal: FakePortal) -> None:
    lead, made, activity = converted_lead_with(portal)
    comment = portal.add_timeline_comment("lead", lead, "Called, wants 20 chairs")

    job = await scenario(rule(on="ONCRMLEADUPDATE", when="{lead_status: converted}",
                              do="[{bind: [lead.contact, lead.company]}, {unbind: lead}, {timeline_comments: follow}]"),
                         "ONCRMLEADUPDATE", lead)

    assert sorted(portal.comment_bindings(comment)) == sorted([("contact", made["contact"]),
                                                               ("company", made["company"])]), job
    assert portal.bindings(activity) == [(CONTACT, made["contact"]), (COMPANY, made["company"])]


async def test_dry_run_records_the_plan_and_writes_nothing(scenario: Any, portal: FakePortal) -> None:
    lead, made, activity = converted_lead_with(portal)
    history = list(portal.binding_history[activity])

    job = await scenario(rule(extra="    mode: dry_run\n"), "ONCRMACTIVITYADD", activity)

    assert portal.binding_history[activity] == history
    assert job["plan"][0]["dry_run"] is True
    assert bindings_text(job["plan"][0]["after"]) == f"contact {made['contact']}"
    assert job["changes"][0]["status"] == "dry_run"


async def test_stop_ends_the_search(scenario: Any, portal: FakePortal) -> None:
    lead, made, activity = converted_lead_with(portal)
    text = rule(do="[{bind: [lead.contact]}]", extra="    stop: true\n") + (
        "  - name: later\n    on: [ONCRMACTIVITYADD]\n    do: [{bind: [lead.deal]}]\n")

    job = await scenario(text, "ONCRMACTIVITYADD", activity)

    assert portal.bindings(activity) == [(LEAD, lead), (CONTACT, made["contact"])]
    assert job["rules"] == ["r"]


@pytest.mark.parametrize("late", [False, True])  # within the seconds after the writes, or later
async def test_the_echo_of_our_own_change_costs_at_most_one_read_and_no_write(
        scenario: Any, portal: FakePortal, redis: Any, late: bool) -> None:
    lead, made, activity = converted_lead_with(portal)
    text = rule(on="ONCRMACTIVITYADD, ONCRMACTIVITYUPDATE")
    await scenario(text, "ONCRMACTIVITYADD", activity)
    portal.reset_counters()
    if late:  # the grace after the writes is over: only the fingerprint tells the echo
        await redis.delete(*await redis.keys("*b24:writing:*"))

    echo = await scenario(text, "ONCRMACTIVITYUPDATE", activity)

    assert echo["state"] == "skipped"
    assert "echo" in echo["outcome"]
    assert portal.request_count == (1 if late else 0)


async def test_an_activity_changed_too_often_is_held_back(scenario: Any, portal: FakePortal, redis: Any) -> None:
    lead, made, activity = converted_lead_with(portal)
    await record_changes(redis, ChangeLog(redis, "acme"), activity, times=MAX_CHANGES_PER_WINDOW)

    job = await scenario(rule(), "ONCRMACTIVITYADD", activity)

    assert portal.bindings(activity) == [(LEAD, lead)]
    assert "undo each other" in job["plan"][0]["notes"][0]
