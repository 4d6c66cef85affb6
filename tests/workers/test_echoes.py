"""The echo of the service's own writes: every binding write fires ONCRMACTIVITYUPDATE (protocol notes,
section 0), which the fake portal posts to the service as a subscribed portal's queue does. Real Redis,
the real worker, the fake portal over HTTP."""
from __future__ import annotations

from typing import Any

import pytest

from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
from app.web import create_app
from tests.conftest import DOMAIN, TOKEN, post_event, rules_with

# The default rule, listening to activity updates too: every echo reaches a job.
LISTENING_RULES = """
rules:
  - name: converted-lead-history-follows-client
    on: [ONCRMACTIVITYADD, ONCRMACTIVITYUPDATE, ONCRMLEADUPDATE, ONCRMCONTACTADD, ONCRMCOMPANYADD]
    when: {bound_to: lead, lead_status: converted}
    do:
      - bind: [lead.contact, lead.company]
      - unbind: lead
"""


@pytest.mark.parametrize("how", ["portal", "rest"])
async def test_the_echoes_of_a_200_activity_conversion_rewrite_nothing_and_cost_at_most_a_read_each(
        aiohttp_client: Any, settings: Any, portal_config: Any, make_worker: Any, redis: Any, portal: FakePortal,
        how: str) -> None:
    rules = rules_with(LISTENING_RULES, portal_config)
    client = await aiohttp_client(create_app(settings, rules))
    portal.subscribe(str(client.make_url("/bitrix/events")), TOKEN, DOMAIN)
    lead = portal.add_lead("Big client")
    activities = [portal.add_activity([(LEAD, lead)], subject=f"mail {i}") for i in range(200)]
    mark = len(portal.events)
    if how == "portal":
        made = portal.convert_lead(lead)  # copies to contact and company: the service only unbinds
        contact, company = made["contact"], made["company"]
    else:
        contact = portal.convert_lead_over_rest(lead)  # nothing attached: the service binds, then unbinds
        company = portal.add_company("Acme")
        portal.update_lead(lead, COMPANY_ID=company)
    portal.reset_counters()
    portal.method_calls.clear()

    for event, entity_id in portal.events[mark:]:
        status, answer = await post_event(client, event, entity_id)
        assert status == 200, answer
    await make_worker(rules=rules).run_check()
    await portal.echoes_sent()
    writes = sum(portal.method_calls[f"crm.activity.binding.{m}"] for m in ("add", "delete", "move"))
    requests_before_echoes = portal.request_count
    reads_before_echoes = portal.method_calls["crm.activity.binding.list"]
    await make_worker(rules=rules).run_check()  # whatever echo arrived after the first worker stopped

    assert all(portal.bindings(a) == [(CONTACT, contact), (COMPANY, company)] for a in activities)
    assert len(portal.echoes) == writes == 200 * (1 if how == "portal" else 3)
    assert portal.echoes_posted == len(portal.echoes)  # every echo reached the service and was accepted
    # No job rewrote anything: the writes are the plan's, once.
    assert sum(portal.method_calls[f"crm.activity.binding.{m}"] for m in ("add", "delete", "move")) == writes
    # At most one binding read per activity for all its echoes (each job of an echo reads its bindings
    # once, or not at all while the service is still writing), packed 50 to a request.
    echo_reads = portal.method_calls["crm.activity.binding.list"] - (reads_before_echoes if how == "portal" else 0)
    assert echo_reads <= 200, portal.method_calls
    assert portal.request_count - requests_before_echoes <= 200 // 50 + 1, portal.request_count
    echo_jobs = [j for j in await every_job(client) if j["event"] == "ONCRMACTIVITYUPDATE"]
    assert echo_jobs and all(j["state"] == "skipped" for j in echo_jobs), {j["state"] for j in echo_jobs}


async def every_job(client: Any) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    cursor = ""
    while True:
        page = await (await client.get(f"/api/jobs?limit=100{cursor}")).json()
        jobs += page["jobs"]
        if not page["next_cursor"]:
            return jobs
        cursor = f"&cursor={page['next_cursor']}"
