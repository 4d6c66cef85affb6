"""The audit log and undo, over real Redis, a real worker and the fake portal."""
from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from arq import Worker

from app.bitrix.client import RestClient
from app.bitrix.ratelimit import RateLimiter
from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
from app.rebind.reading import BINDINGS_SAMPLE
from app.rules.facts import bindings_text
from app.store.audit import JOB_KEY as AUDIT_JOB_KEY
from app.rebind.undo import UndoRefused, undo_job
from app.store.audit import AuditLog
from app.store.jobs import JOB_KEY, JobRecord, JobStore
from app.store.namespace import prefixed
from app.store.queue import JobQueue
from tests.conftest import post_event, rules_with


async def undo(job_id: str, redis: Any, rules: Any) -> Any:
    async with aiohttp.ClientSession() as http:
        client = RestClient(http, rules.portals["acme"], RateLimiter(redis))
        return await undo_job(job_id, AuditLog(redis, 3600), client)


async def convert_with_activities(client: Any, worker: Worker, portal: FakePortal, n: int = 3) -> Any:
    lead = portal.add_lead()
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(n)]
    made = portal.convert_lead(lead)
    _, answer = await post_event(client, "ONCRMLEADUPDATE", lead)
    await worker.run_check()
    return lead, activities, made, answer["job_id"]


async def test_each_change_is_in_the_audit_log_of_its_activity(client: Any, worker: Worker,
                                                               portal: FakePortal) -> None:
    lead, activities, made, job_id = await convert_with_activities(client, worker, portal)

    response = await client.get(f"/api/audit?activity={activities[1]}")
    by_job = await (await client.get(f"/api/audit?job={job_id}")).json()

    [entry] = (await response.json())["entries"]
    assert entry["portal"] == "acme" and entry["job"] == job_id and entry["item"] == activities[1]
    # The portal's conversion copied the activity to the company and the contact; the job removed the lead.
    assert bindings_text(entry["before"]) == f"lead {lead}, company {made['company']}, contact {made['contact']}"
    assert entry["after"] == [{"entity_type": COMPANY, "entity_id": made["company"]},
                              {"entity_type": CONTACT, "entity_id": made["contact"]}]
    assert entry["rules"] == ["converted-lead-history-follows-client"]
    assert [e["item"] for e in by_job["entries"]] == activities


@pytest.mark.parametrize("query, message", [("", "give activity=ID, comment=ID or job=ID"),
                                            ("activity=x", "activity must be a whole number"),
                                            ("job=../x", "job must be a job id"),
                                            ("activity=1&who=me", "unknown parameter 'who'")])
async def test_a_bad_audit_query_is_a_400(client: Any, query: str, message: str) -> None:
    response = await client.get(f"/api/audit?{query}")
    assert response.status == 400
    assert message in (await response.json())["error"]


async def test_undo_restores_exactly_the_previous_bindings(client: Any, worker: Worker, portal: FakePortal,
                                                           redis: Any, rules: Any) -> None:
    lead, activities, made, job_id = await convert_with_activities(client, worker, portal)
    assert all(portal.bindings(a) == [(CONTACT, made["contact"]), (COMPANY, made["company"])] for a in activities)

    result = await undo(job_id, redis, rules)

    assert result.errors == []
    assert [e.item for e in result.restored] == activities
    for activity in activities:
        assert portal.bindings(activity) == [(LEAD, lead), (CONTACT, made["contact"]), (COMPANY, made["company"])]
        assert all(state for state in portal.binding_history[activity]), "never without a binding"
    history = await (await client.get(f"/api/audit?activity={activities[0]}")).json()
    assert [e["undo_of"] for e in history["entries"]] == [job_id, None]
    with pytest.raises(UndoRefused, match="undone already"):
        await undo(job_id, redis, rules)


async def test_undo_stops_when_an_activity_changed_since(client: Any, worker: Worker, portal: FakePortal,
                                                         redis: Any, rules: Any) -> None:
    lead, activities, made, job_id = await convert_with_activities(client, worker, portal)
    portal.bind_by_hand(activities[2], (LEAD, lead))  # someone bound it again
    before = {a: list(portal.bindings(a)) for a in activities}

    with pytest.raises(UndoRefused) as refused:
        await undo(job_id, redis, rules)

    assert f"activity {activities[2]}: the job left [company {made['company']}, contact {made['contact']}]" \
        in str(refused.value)
    assert {a: portal.bindings(a) for a in activities} == before, "nothing was changed"


async def test_a_job_recorded_with_bindings_as_text_reads_as_values_and_undoes(
        client: Any, worker: Worker, portal: FakePortal, redis: Any, rules: Any) -> None:
    """A release before this one kept bindings as text ("contact 42"); its records live 14 days."""
    lead, [activity], made, job_id = await convert_with_activities(client, worker, portal, n=1)
    store = JobStore(redis, 3600)
    record = await store.get(job_id)
    assert record is not None
    as_text = [{**change, "before": bindings_text(change["before"]).split(", "),
                "after": bindings_text(change["after"]).split(", ")} for change in record.changes]
    await redis.set(prefixed(f"{JOB_KEY}{job_id}"), record.model_copy(update={"changes": as_text}).model_dump_json())
    entries = [json.loads(raw) for raw in await redis.lrange(prefixed(AUDIT_JOB_KEY + job_id), 0, -1)]
    await redis.delete(prefixed(AUDIT_JOB_KEY + job_id))
    await redis.rpush(prefixed(AUDIT_JOB_KEY + job_id), *[json.dumps(
        {**e, "before": bindings_text(e["before"]).split(", "), "after": bindings_text(e["after"]).split(", ")})
        for e in entries])
    assert b'"lead ' in await redis.get(prefixed(f"{JOB_KEY}{job_id}"))

    job = await (await client.get(f"/api/jobs/{job_id}")).json()
    result = await undo(job_id, redis, rules)

    assert job["changes"][0]["before"] == [{"entity_type": LEAD, "entity_id": lead},
                                           {"entity_type": COMPANY, "entity_id": made["company"]},
                                           {"entity_type": CONTACT, "entity_id": made["contact"]}]
    assert result.errors == [] and [e.item for e in result.restored] == [activity]
    assert portal.bindings(activity) == [(LEAD, lead), (CONTACT, made["contact"]), (COMPANY, made["company"])]
    [undo_entry, _] = (await (await client.get(f"/api/audit?activity={activity}")).json())["entries"]
    assert undo_entry["after"][0] == {"entity_type": LEAD, "entity_id": lead}


async def test_undo_is_refused_when_a_record_to_bind_back_is_deleted(client: Any, worker: Worker, portal: FakePortal,
                                                                    redis: Any, rules: Any) -> None:
    """The portal would accept a binding to the deleted lead: undo is a plan the executor checks first."""
    lead, activities, made, job_id = await convert_with_activities(client, worker, portal)
    portal.delete_entity(LEAD, lead)
    before = {a: list(portal.bindings(a)) for a in activities}

    with pytest.raises(UndoRefused, match=f"lead {lead} no longer exist.*nothing was changed"):
        await undo(job_id, redis, rules)

    assert {a: portal.bindings(a) for a in activities} == before
    assert await AuditLog(redis, 3600).undone_at(job_id) is None


async def test_undo_of_comments_binds_them_back_before_unbinding(make_worker: Any, portal: FakePortal, redis: Any,
                                                                 portal_config: Any) -> None:
    rules = rules_with("rules:\n  - name: r\n    on: [ONCRMLEADUPDATE]\n    when: {lead_status: converted}\n"
                       "    do: [{bind: [lead.contact]}, {unbind: lead}, {timeline_comments: follow}]\n", portal_config)
    lead = portal.add_lead()
    comment = portal.add_timeline_comment("lead", lead, "Called, wants 20 chairs")
    portal.convert_lead(lead)
    converted = sorted(portal.comment_bindings(comment))
    record = JobRecord.for_event("acme", "ONCRMLEADUPDATE", lead, "1")
    await JobQueue(redis, JobStore(redis, 3600)).submit(record)
    await make_worker(rules=rules).run_check()
    assert ("lead", lead) in converted and ("lead", lead) not in portal.comment_bindings(comment)

    result = await undo(record.id, redis, rules)

    assert result.errors == [] and [(e.kind, e.item) for e in result.restored] == [("comment", comment)]
    assert sorted(portal.comment_bindings(comment)) == converted


async def test_undo_of_blind_adds_keeps_a_binding_the_portal_said_was_there(
        client: Any, worker: Worker, portal: FakePortal, redis: Any, rules: Any) -> None:
    lead = portal.add_lead(email="ann@example.com")
    plain = [portal.add_activity([(LEAD, lead)]) for _ in range(2)]  # the sample (the first): the lead only
    contact = portal.convert_lead_over_rest(lead)  # nothing attached: the job adds blind
    # An e-mail from the contact's address, which the portal bound to the lead and to the contact.
    known = portal.add_activity([(LEAD, lead), (CONTACT, contact)], subject="Re: offer")
    _, answer = await post_event(client, "ONCRMLEADUPDATE", lead)
    await worker.run_check()
    assert all(portal.bindings(a) == [(CONTACT, contact)] for a in [*plain, known])
    # Facts read the sample only; the other two activities' bindings were read by the executor, with the
    # targets' checks, before adding (a save past 100 bindings would drop one without a word).
    assert portal.method_calls["crm.activity.binding.list"] == BINDINGS_SAMPLE + 2

    [entry] = [e for e in await AuditLog(redis, 3600).for_job(answer["job_id"]) if e.item == known]
    assert bindings_text(entry.before) == f"lead {lead}, contact {contact}"  # 'already bound' is part of before
    result = await undo(answer["job_id"], redis, rules)

    assert result.errors == []
    assert portal.bindings(known) == [(LEAD, lead), (CONTACT, contact)]  # exactly as the portal left it
    assert all(portal.bindings(a) == [(LEAD, lead)] for a in plain)
