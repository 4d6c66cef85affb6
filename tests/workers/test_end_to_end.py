"""From a portal's event to re-bound activities: real Redis, real worker, the fake portal over HTTP."""
from __future__ import annotations

from typing import Any

from arq import Worker

from app.fakeportal import COMPANY, CONTACT, DEAL, LEAD, FakePortal
from tests.conftest import TOKEN, WEBHOOK_CODE, post_event


async def test_activity_on_a_converted_lead_moves_to_its_contact_and_company(client: Any, worker: Worker,
                                                                              portal: FakePortal) -> None:
    lead = portal.add_lead(title="Anna")
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)], subject="Re: prices")

    status, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    assert status == 200, answer
    await worker.run_check()

    assert portal.bindings(activity) == [(CONTACT, made["contact"]), (COMPANY, made["company"])]
    job = await (await client.get(f"/api/jobs/{answer['job_id']}")).json()
    assert job["state"] == "succeeded"
    assert job["rules"] == ["converted-lead-history-follows-client"]
    # Bindings as values: the type as crm.enum.ownertype numbers it, and the record's id.
    assert job["changes"][0]["before"] == [{"entity_type": LEAD, "entity_id": lead}]
    assert job["changes"][0]["after"] == [{"entity_type": CONTACT, "entity_id": made["contact"]},
                                          {"entity_type": COMPANY, "entity_id": made["company"]}]


async def test_a_conversion_moves_120_activities_in_at_most_20_requests(client: Any, worker: Worker,
                                                                        portal: FakePortal) -> None:
    lead = portal.add_lead(title="Big client")
    activities = [portal.add_activity([(LEAD, lead)], subject=f"mail {i}") for i in range(120)]
    made = portal.convert_lead(lead, deal=True)
    portal.reset_counters()

    status, answer = await post_event(client, "ONCRMLEADUPDATE", lead)
    await worker.run_check()

    # The portal's conversion copied them to the deal, contact and company; the service removed the lead.
    expected = [(DEAL, made["deal"]), (CONTACT, made["contact"]), (COMPANY, made["company"])]
    assert all(portal.bindings(a) == expected for a in activities)
    assert portal.request_count <= 20, portal.requests
    job = await (await client.get(f"/api/jobs/{answer['job_id']}")).json()
    assert job["requests"] == portal.request_count


async def test_activities_never_lose_their_last_binding_on_the_way(client: Any, worker: Worker,
                                                                   portal: FakePortal) -> None:
    lead = portal.add_lead()
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(5)]
    portal.convert_lead(lead, contact=True, company=False)

    await post_event(client, "ONCRMLEADUPDATE", lead)
    await worker.run_check()

    for activity in activities:
        history = portal.binding_history[activity]
        assert all(state for state in history), history
        assert history[1] == ((LEAD, lead), (CONTACT, history[-1][0][1])) or len(history[1]) == 2


async def test_a_forged_token_queues_nothing(client: Any, worker: Worker, portal: FakePortal, redis: Any) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])

    status, answer = await post_event(client, "ONCRMACTIVITYADD", activity, token="guessed")

    assert status == 401
    assert "job_id" not in answer
    assert await redis.zcard("arq:queue") == 0
    assert await worker.run_check() == 0
    assert portal.bindings(activity) == [(LEAD, lead)]


async def test_a_duplicate_delivery_changes_nothing(client: Any, make_worker: Any, portal: FakePortal,
                                                    redis: Any) -> None:
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])

    _, first = await post_event(client, "ONCRMACTIVITYADD", activity)
    _, second = await post_event(client, "ONCRMACTIVITYADD", activity)
    assert second == {"job_id": first["job_id"], "duplicate": True}
    assert await redis.zcard("arq:queue") == 1
    await make_worker().run_check()
    history_after_first = list(portal.binding_history[activity])

    # The same event delivered again after the job ran, and the echo our change may cause.
    await post_event(client, "ONCRMACTIVITYADD", activity)
    await post_event(client, "ONCRMACTIVITYADD", activity, ts=1766047999)
    portal.reset_counters()
    await make_worker().run_check()

    assert portal.binding_history[activity] == history_after_first
    assert portal.bindings(activity) == [(CONTACT, made["contact"]), (COMPANY, made["company"])]
    assert all(method != "batch" or n <= 2 for method, n in portal.requests)  # reads only, no writes


async def test_a_portal_that_refuses_for_a_while_still_ends_right(client: Any, worker: Worker,
                                                                  portal: FakePortal) -> None:
    lead = portal.add_lead()
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(60)]
    made = portal.convert_lead(lead)
    portal.fail_next(3, status=503, error="QUERY_LIMIT_EXCEEDED")

    _, answer = await post_event(client, "ONCRMLEADUPDATE", lead)
    await worker.run_check()
    portal.fail_next(2, status=500, error="INTERNAL_SERVER_ERROR")
    portal.html_next(1, status=502)
    _, again = await post_event(client, "ONCRMLEADUPDATE", lead, ts=1766048000)
    await worker.run_check()

    expected = [(CONTACT, made["contact"]), (COMPANY, made["company"])]
    assert all(portal.bindings(a) == expected for a in activities)
    job = await (await client.get(f"/api/jobs/{answer['job_id']}")).json()
    assert job["state"] == "succeeded"


async def test_writes_failing_with_500_are_re_read_not_blindly_resent(client: Any, worker: Worker,
                                                                      portal: FakePortal) -> None:
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    portal.lose_answers(1, containing="crm.activity.binding.add")

    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    await worker.run_check()

    assert portal.bindings(activity) == [(CONTACT, made["contact"]), (COMPANY, made["company"])]
    job = await (await client.get(f"/api/jobs/{answer['job_id']}")).json()
    assert [a["outcome"] for a in job["attempts"]] == ["succeeded"]
    # Read the activity, its lead, write binds and unbind in one batch (done, answer lost), re-read the
    # bindings: all done, nothing is sent again.
    assert portal.request_count == 4
    # 2 target reads + 2 binds + 1 unbind, then the re-read
    assert portal.requests[-2:] == [("batch", 5), ("batch", 1)]


async def test_a_contact_made_from_a_lead_re_runs_that_lead(client: Any, worker: Worker, portal: FakePortal) -> None:
    lead = portal.add_lead()
    activity = portal.add_activity([(LEAD, lead)])
    made = portal.convert_lead(lead, contact=True, company=False)

    _, answer = await post_event(client, "ONCRMCONTACTADD", made["contact"])
    await worker.run_check()

    assert portal.bindings(activity) == [(CONTACT, made["contact"])]


async def test_an_unconverted_lead_update_reads_once_and_writes_nothing(client: Any, worker: Worker,
                                                                        portal: FakePortal) -> None:
    lead = portal.add_lead()
    activity = portal.add_activity([(LEAD, lead)])

    _, answer = await post_event(client, "ONCRMLEADUPDATE", lead)
    await worker.run_check()

    assert portal.bindings(activity) == [(LEAD, lead)]
    assert portal.request_count == 1
    job = await (await client.get(f"/api/jobs/{answer['job_id']}")).json()
    assert job["state"] == "skipped"


async def test_an_activity_deleted_before_the_job_runs_is_skipped(client: Any, worker: Worker,
                                                                  portal: FakePortal) -> None:
    _, answer = await post_event(client, "ONCRMACTIVITYADD", 424242)
    await worker.run_check()

    job = await (await client.get(f"/api/jobs/{answer['job_id']}")).json()
    assert job["state"] == "skipped"
    assert "no longer exists" in job["outcome"]


async def test_access_denied_fails_the_job_with_what_to_do_and_no_retry(client: Any, worker: Worker,
                                                                        portal: FakePortal) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    portal.fail_next(1, status=403, error="ACCESS_DENIED", description="Access denied!")

    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    await worker.run_check()

    job = await (await client.get(f"/api/jobs/{answer['job_id']}")).json()
    assert job["state"] == "failed"
    assert len(job["attempts"]) == 1
    assert job["error"]["code"] == "ACCESS_DENIED"
    assert "CRM rights" in job["error"]["what_to_do"]
    assert portal.bindings(activity) == [(LEAD, lead)]


async def test_a_wrong_webhook_code_fails_with_a_fix_it_message_and_no_secret(client: Any, make_worker: Any,
                                                                             portal: FakePortal, rules: Any,
                                                                             caplog: Any) -> None:
    config = rules.portals["acme"].model_copy(update={"rest_url": rules.portals["acme"].rest_url.__class__(
        portal.rest_url.replace(WEBHOOK_CODE, "wrongcode"))})
    broken = rules.model_copy(update={"portals": {"acme": config}})
    lead = portal.add_lead()
    activity = portal.add_activity([(LEAD, lead)])

    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    await make_worker(rules=broken).run_check()

    raw = await client.get(f"/api/jobs/{answer['job_id']}")
    text = await raw.text()
    job = await raw.json()
    assert job["state"] == "failed"
    assert job["error"]["code"] == "NO_AUTH_FOUND"
    assert "inbound webhook" in job["error"]["what_to_do"]
    for secret in ("wrongcode", WEBHOOK_CODE, TOKEN):
        assert secret not in text
        assert secret not in caplog.text


async def test_the_payloads_endpoints_are_never_called(client: Any, worker: Worker, portal: FakePortal) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    async with FakePortal(webhook_code="x", per_second=None) as elsewhere:
        await post_event(client, "ONCRMACTIVITYADD", activity, **{
            "auth[client_endpoint]": elsewhere.base_url + "/rest/", "auth[server_endpoint]": elsewhere.base_url})
        await worker.run_check()

        assert elsewhere.request_count == 0
    assert portal.request_count > 0


async def test_a_failed_job_is_logged_as_a_warning_with_its_code(client: Any, worker: Worker, portal: FakePortal,
                                                                 caplog: Any) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    portal.fail_next(1, status=403, error="ACCESS_DENIED", description="Access denied!")
    _, answer = await post_event(client, "ONCRMACTIVITYADD", portal.add_activity([(LEAD, lead)]))

    with caplog.at_level("INFO", logger="workers.tasks"):
        await worker.run_check()

    (line,) = [r for r in caplog.records if r.name == "workers.tasks" and answer["job_id"] in r.getMessage()]
    assert line.levelname == "WARNING" and "failed (ACCESS_DENIED)" in line.getMessage()
