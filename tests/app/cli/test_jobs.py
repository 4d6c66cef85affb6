"""`b24rebind jobs|stats|audit|undo` run as the real command (in a thread, so the fake portal keeps serving)."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from arq import Worker

from app.cli.main import main
from app.fakeportal.portal import COMPANY, CONTACT, LEAD, FakePortal
from tests.conftest import DEFAULT_RULES, DOMAIN, TOKEN, post_event


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
    assert status == 0 and job_id in out and "re-bound 1 items" in out
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
    assert status == 1 and "changed no bindings" in err


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
    assert portal.bindings(activity) == [(LEAD, lead)]
    status, _, err = await command("undo", answer["job_id"], capsys=capsys)
    assert status == 1 and "undone already" in err
