"""The audit log and undo, over real Redis, a real worker and the fake portal."""
from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from arq import Worker

from app.bitrix.client import RestClient
from app.bitrix.ratelimit import RateLimiter
from app.fakeportal.portal import COMPANY, CONTACT, LEAD, FakePortal
from app.store.audit import AuditLog, UndoRefused, undo_job
from tests.conftest import post_event


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
    assert entry["before"] == [f"lead {lead}", f"company {made['company']}", f"contact {made['contact']}"]
    assert entry["after"] == [f"company {made['company']}", f"contact {made['contact']}"]
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
