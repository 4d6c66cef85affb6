"""The rules tools: explain reads and never writes, rule tests catch a changed rule, backfill resumes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.bitrix.client import RestClient
from app.bitrix.ratelimit import LocalRateLimiter, RateLimiter
from app.cli.backfill import BackfillRun, queue_backfill, summarise
from app.cli.commands import render_explanation
from app.cli.commands import test_command as run_rule_tests
from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
from app.rebind.reading import FactReader
from app.store.jobs import JobStore
from app.store.queue import BACKFILL_QUEUE, JobQueue
from tests.support.processes import ROOT, b24rebind


async def test_explain_says_which_rules_match_why_others_do_not_and_writes_nothing(
        portal: FakePortal, rules: Any, portal_config: Any) -> None:
    import aiohttp
    text = (ROOT / "rules.example.yaml").read_text()
    from app.rules.loader import parse_rules
    example = parse_rules(text, "rules.yaml", {"B24_WEBHOOK_URL": portal.rest_url, "B24_APPLICATION_TOKEN": "t"})
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)], subject="Re: prices", type_id=2, provider_id="VOXIMPLANT_CALL")
    history = list(portal.binding_history[activity])

    async with aiohttp.ClientSession() as http:
        client = RestClient(http, example.portals["main"], LocalRateLimiter())
        facts = await FactReader(client, example).for_activity("ONCRMACTIVITYADD", activity)
    text = render_explanation(example, facts)

    assert "rule 'converted-lead-history-follows-client' matches" in text
    assert "rule 'known-client-emails-go-to-the-client' does not match: the activity is a call, not email" in text
    assert f"lead {lead}" in text and f"contact {made['contact']}, company {made['company']}" in text
    assert portal.binding_history[activity] == history


def test_rule_tests_fail_when_a_rule_changes(tmp_path: Path, settings: Any) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text((ROOT / "rules.example.yaml").read_text().replace("bind: [lead.contact, lead.company]",
                                                                       "bind: [lead.contact]"))
    cases = tmp_path / "rules.tests.yaml"
    cases.write_text((ROOT / "examples" / "rules.tests.yaml").read_text().replace("../rules.example.yaml",
                                                                                 "rules.yaml"))

    with pytest.MonkeyPatch.context() as env:
        env.setenv("B24_WEBHOOK_URL", "https://x.bitrix24.com/rest/1/x/")
        env.setenv("B24_APPLICATION_TOKEN", "t")
        assert run_rule_tests(cases, settings) == 1


def test_the_shipped_rule_tests_pass_from_the_command_line(tmp_path: Path) -> None:
    result = b24rebind("rules", "test", str(ROOT / "examples" / "rules.tests.yaml"), cwd=tmp_path,
                       env={"B24_WEBHOOK_URL": "https://x.bitrix24.com/rest/1/x/", "B24_APPLICATION_TOKEN": "t"})

    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 passed, 0 failed" in result.stdout


@pytest.fixture
def history(portal: FakePortal) -> list[tuple[int, list[int]]]:
    """300 converted leads, each with one or two activities still bound to it."""
    leads = []
    for n in range(300):
        lead = portal.add_lead(title=f"lead {n}")
        activities = [portal.add_activity([(LEAD, lead)]) for _ in range(1 + n % 2)]
        portal.convert_lead(lead)
        leads.append((lead, activities))
    portal.add_lead(title="still open")
    return leads


async def backfill(run: BackfillRun, portal_config: Any, redis: Any, make_worker: Any,
                   max_leads: int | None = None) -> list[str]:
    import aiohttp
    store = JobStore(redis, 3600)
    async with aiohttp.ClientSession() as http:
        client = RestClient(http, portal_config, RateLimiter(redis), low_priority=True)
        job_ids = await queue_backfill(run, client, JobQueue(redis, store), redis, max_leads=max_leads)
    await make_worker(queue_name=BACKFILL_QUEUE).run_check()
    return job_ids


async def test_backfill_rebinds_history_and_resumes_without_repeating_work(
        history: Any, portal: FakePortal, portal_config: Any, redis: Any, make_worker: Any) -> None:
    run = BackfillRun("acme", "2000-01-01")

    first = await backfill(run, portal_config, redis, make_worker, max_leads=120)  # then interrupted
    assert len(first) == 120
    writes_before = sum(len(portal.binding_history[a]) for _, acts in history for a in acts)
    job_ids = await backfill(run, portal_config, redis, make_worker)

    assert len(job_ids) == 300 and job_ids[:120] == first
    for lead, activities in history:
        contact = int(portal.leads[lead]["CONTACT_ID"])
        company = int(portal.leads[lead]["COMPANY_ID"])
        for activity in activities:
            assert portal.bindings(activity) == [(CONTACT, contact), (COMPANY, company)]
    store = JobStore(redis, 3600)
    records = [await store.get(job_id) for job_id in job_ids]
    assert all(record and len(record.attempts) == 1 for record in records), "no lead was worked twice"
    summary = await summarise(store, job_ids)
    assert (summary.jobs, summary.finished, summary.activities_seen, summary.rebound) == (300, 300, 450, 450)
    assert writes_before < sum(len(portal.binding_history[a]) for _, acts in history for a in acts)


async def test_a_dry_run_backfill_writes_nothing(history: Any, portal: FakePortal, portal_config: Any, redis: Any,
                                                 make_worker: Any) -> None:
    before = {a: list(portal.binding_history[a]) for _, acts in history for a in acts}

    job_ids = await backfill(BackfillRun("acme", "2000-01-01", dry_run=True), portal_config, redis, make_worker)

    assert {a: portal.binding_history[a] for a in before} == before
    record = await JobStore(redis, 3600).get(job_ids[0])
    assert record is not None and record.plan[0]["dry_run"] is True
    lines = (await summarise(JobStore(redis, 3600), job_ids)).lines()
    activities = sum(len(acts) for _, acts in history)
    assert f"dry run: would re-bind {activities} activities (nothing was written;" in "\n".join(lines)
    assert not any(line.startswith("activities re-bound") for line in lines)


async def test_backfill_leaves_half_the_burst_to_live_events(redis: Any) -> None:
    limiter = RateLimiter(redis, headroom=0)
    for _ in range(5):
        await limiter.acquire("acme", per_second=0.001, burst=10, reserve=5)

    assert limiter.stats.waits == 0
    await limiter.acquire("acme", per_second=0.001, burst=10)  # a live request still gets in at once
    assert limiter.stats.waits == 0


async def explanation(portal: FakePortal, rules: Any, portal_config: Any, lead: int) -> str:
    import aiohttp
    async with aiohttp.ClientSession() as http:
        client = RestClient(http, portal_config, LocalRateLimiter())
        facts = await FactReader(client, rules).for_lead("ONCRMLEADUPDATE", lead)
    return render_explanation(rules, facts)


async def test_explain_says_a_lead_in_progress_is_not_converted_yet(portal: FakePortal, rules: Any,
                                                                    portal_config: Any) -> None:
    lead = portal.add_lead(status="IN_PROCESS")
    portal.add_activity([(LEAD, lead)])

    text = await explanation(portal, rules, portal_config, lead)

    assert f"Lead {lead} is in progress (status IN_PROCESS)" in text and "converted" in text
    assert "none are bound" not in text


async def test_explain_says_a_conversion_that_made_no_client_leaves_the_targets_empty(
        portal: FakePortal, rules: Any, portal_config: Any) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead, contact=False, company=False, deal=True)
    portal.add_activity([(LEAD, lead)])

    text = await explanation(portal, rules, portal_config, lead)

    assert ("has nothing to bind: lead.contact, lead.company are empty (the lead's conversion made no contact or "
            "company)") in text
