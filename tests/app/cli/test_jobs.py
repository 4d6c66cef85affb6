"""`b24rebind jobs|stats|audit|undo` run as the real command (in a thread, so the fake portal keeps serving)."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from arq import Worker

from app.cli.main import main
from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
from tests.conftest import DEFAULT_RULES, DOMAIN, TOKEN, post_event, rules_with


@pytest.fixture
def command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_url: str, portal: FakePortal) -> Any:
    """Run `b24rebind ARGS` against the test Redis and a rules file naming the fake portal."""
    rules = tmp_path / "cli-rules.yaml"
    rules.write_text(f"portals:\n  acme:\n    domain: {DOMAIN}\n    rest_url: {portal.rest_url}\n"
                     f"    application_token: {TOKEN}\n    rate_limit: {{per_second: 1000, burst: 1000}}\n"
                     + DEFAULT_RULES)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("B24_RULES", str(rules))
    monkeypatch.chdir(tmp_path)  # no stray .env

    async def run(*argv: str, capsys: Any) -> tuple[int, str, str]:
        status = await asyncio.to_thread(main, list(argv))
        out, err = capsys.readouterr()
        return status, out, err

    return run


async def test_list_show_stats_and_audit(client: Any, worker: Worker, portal: FakePortal, command: Any,
                                         capsys: Any) -> None:
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    await worker.run_check()
    job_id = answer["job_id"]

    status, out, _ = await command("jobs", "list", "--state", "succeeded", capsys=capsys)
    assert status == 0 and job_id in out and "re-bound 1 item" in out and "1 items" not in out
    status, out, _ = await command("jobs", "show", job_id, capsys=capsys)
    assert f"activity {activity}: [lead {lead}] -> [contact {made['contact']}, company {made['company']}]" in out
    status, out, _ = await command("stats", "--json", capsys=capsys)
    assert json.loads(out)["jobs"]["succeeded"] == 1
    status, out, _ = await command("audit", "--activity", str(activity), capsys=capsys)
    assert f"job {job_id}" in out and f"[lead {lead}] -> [contact {made['contact']}" in out
    status, out, _ = await command("jobs", "watch", "--once", capsys=capsys)
    assert status == 0 and "succeeded 1" in out and job_id in out


async def test_bad_filters_and_unknown_jobs_exit_non_zero_with_a_message(client: Any, command: Any,
                                                                         capsys: Any) -> None:
    status, _, err = await command("jobs", "list", "--state", "lost", capsys=capsys)
    assert status == 2 and "state 'lost' is not a job state" in err
    status, _, err = await command("jobs", "retry", capsys=capsys)
    assert status == 2 and "--state failed" in err
    status, _, err = await command("undo", "nosuchjob", capsys=capsys)
    assert status == 6 and "no job 'nosuchjob'" in err
    status, _, err = await command("jobs", "show", "nosuchjob", capsys=capsys)
    assert status == 6 and "no job 'nosuchjob'" in err


async def test_retry_failed_jobs_then_undo_one(client: Any, make_worker: Any, portal: FakePortal, command: Any,
                                               capsys: Any) -> None:
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    portal.fail_next(1, status=403, error="ACCESS_DENIED", description="Access denied!")
    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    await make_worker().run_check()

    status, out, _ = await command("jobs", "retry", "--state", "failed", capsys=capsys)
    assert status == 0 and answer["job_id"] in out
    await make_worker().run_check()
    assert portal.bindings(activity) == [(CONTACT, made["contact"]), (COMPANY, made["company"])]

    status, out, _ = await command("undo", answer["job_id"], capsys=capsys)
    assert status == 0 and f"activity {activity}: restored [lead {lead}]" in out
    assert "is now undone" in out and "apply again on the next event" in out and "enabled: false" in out
    assert portal.bindings(activity) == [(LEAD, lead)]
    status, out, _ = await command("jobs", "show", answer["job_id"], capsys=capsys)
    assert f"job {answer['job_id']}: undone — undone: 1 item restored" in out
    status, out, _ = await command("jobs", "list", "--state", "undone", capsys=capsys)
    assert answer["job_id"] in out
    status, _, err = await command("undo", answer["job_id"], capsys=capsys)
    assert status == 1 and "undone already" in err

    # Retried after the undo, the job applies its rule again, and can be undone again.
    status, _, _ = await command("jobs", "retry", answer["job_id"], capsys=capsys)
    await make_worker().run_check()
    assert portal.bindings(activity) == [(CONTACT, made["contact"]), (COMPANY, made["company"])]
    status, out, err = await command("undo", answer["job_id"], capsys=capsys)
    assert status == 0 and f"activity {activity}: restored [lead {lead}]" in out, err
    assert portal.bindings(activity) == [(LEAD, lead)]


async def test_attempts_are_numbered_across_retries_by_hand(client: Any, make_worker: Any, portal: FakePortal,
                                                            command: Any, capsys: Any) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    for _ in range(2):
        portal.fail_next(1, status=403, error="ACCESS_DENIED", description="Access denied!")
        await make_worker().run_check()
        await command("jobs", "retry", answer["job_id"], capsys=capsys)
    await make_worker().run_check()

    status, out, _ = await command("jobs", "show", answer["job_id"], capsys=capsys)
    attempts = [line.split(" at ")[0].strip() for line in out.splitlines() if line.strip().startswith("attempt")]
    assert attempts == ["attempt 1", "attempt 2", "attempt 3"], out
    assert "attempt 3 at" in out and out.count("failed (ACCESS_DENIED)") == 2


async def test_a_dry_run_shows_what_it_would_do(client: Any, make_worker: Any, portal: FakePortal,
                                                portal_config: Any, command: Any, capsys: Any) -> None:
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    dry = rules_with(DEFAULT_RULES.replace("rules:", "mode: dry_run\nrules:", 1), portal_config)
    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    await make_worker(rules=dry).run_check()

    status, out, _ = await command("jobs", "show", answer["job_id"], capsys=capsys)
    assert "succeeded — dry run: would re-bind 1 item, wrote nothing" in out
    assert (f"activity {activity}: [lead {lead}] -> [contact {made['contact']}, company {made['company']}] "
            "(dry run: would be, nothing written)") in out
    assert portal.bindings(activity) == [(LEAD, lead)]


async def test_watch_keeps_a_dry_run_backfill_apart_from_a_real_one(redis: Any, command: Any, capsys: Any) -> None:
    from app.store.jobs import JobRecord, JobState, JobStore
    store = JobStore(redis, 3600)
    for lead, dry_run, state in ((1, True, JobState.SUCCEEDED), (2, True, JobState.SUCCEEDED),
                                 (1, False, JobState.SUCCEEDED), (2, False, JobState.QUEUED)):
        record = JobRecord.for_event("acme", "ONCRMLEADUPDATE", lead, f"backfill:{dry_run}")
        record = record.model_copy(update={"trigger": "backfill", "dry_run": dry_run, "state": state})
        await store.create(record)

    status, out, _ = await command("jobs", "watch", "--once", capsys=capsys)

    assert status == 0
    assert "backfill           [###############...............] 1/2" in out
    assert "backfill (dry run) [##############################] 2/2" in out
    status, out, _ = await command("stats", capsys=capsys)
    assert "throughput: 0 jobs finished in the last minute, 4 received" in out
    assert "portal acme (acme.bitrix24.com): not asked yet;" in out and "0 refused by the portal" in out


def test_the_job_table_fits_a_terminal_with_an_ellipsis_and_keeps_full_text_in_a_pipe(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import sys

    from app.cli import jobs as jobs_cli
    from app.store.jobs import JobRecord
    record = JobRecord.for_event("acme", "ONCRMACTIVITYADD", 7, "1").model_copy(update={"outcome": "x" * 300})

    piped = jobs_cli._table([record])
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(jobs_cli.shutil, "get_terminal_size", lambda: os.terminal_size((120, 40)))
    on_screen = jobs_cli._table([record])

    assert "x" * 300 in piped
    assert all(len(line) <= 120 for line in on_screen.splitlines())
    assert on_screen.splitlines()[1].endswith("x…")
