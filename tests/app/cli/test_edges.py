"""Every command at its edge: Redis down, the portal down, a wrong webhook code, a gone activity, Ctrl-C.

Each is run as a user runs it (a subprocess) and must end in one line saying what is wrong and what to
do, an exit status that tells the cases apart, and no traceback.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import pytest

from app.cli.exits import Exit
from app.fakeportal import LEAD, FakePortal
from tests.support.processes import ROOT, as_from_a_terminal, ended_async
from tests.support.waiting import until
from tests.conftest import DEFAULT_RULES, DOMAIN, TOKEN


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the socket is closed


def rules_file(tmp_path: Path, rest_url: str, extra: str = "") -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(f"portals:\n  acme:\n    domain: {DOMAIN}\n    rest_url: {rest_url}\n"
                    f"    application_token: {TOKEN}\n{extra}" + DEFAULT_RULES)
    return path


async def b24rebind(*args: str, cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    """The command in a subprocess, while this test's event loop keeps the fake portal answering."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", *args, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "B24_DATA_DIR": str(cwd), **env})
    async with ended_async(process):
        out, err = await asyncio.wait_for(process.communicate(), timeout=90)
    return process.returncode or 0, out.decode(), err.decode()


def one_line(err: str) -> str:
    assert "Traceback" not in err and "Unclosed" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("command", [("jobs", "list"), ("jobs", "show", "abc"), ("stats",), ("undo", "abc"),
                                     ("audit", "--activity", "1"), ("backfill", "--since", "2026-01-01")])
async def test_redis_down_is_one_line_and_exit_3(tmp_path: Path, command: tuple[str, ...]) -> None:
    port = closed_port()
    rules_file(tmp_path, "https://acme.bitrix24.com/rest/1/code/")

    status, _, err = await b24rebind(*command, cwd=tmp_path, env={"REDIS_URL": f"redis://127.0.0.1:{port}/0"})

    assert status == Exit.REDIS_DOWN
    assert one_line(err) == (f"b24rebind: Redis at 127.0.0.1:{port} is unreachable (connection refused): start it, "
                             "or fix REDIS_URL (unset, b24rebind starts its bundled Redis)")


async def test_a_gone_activity_is_not_found_exit_6(tmp_path: Path, portal: FakePortal) -> None:
    rules_file(tmp_path, portal.rest_url)

    status, _, err = await b24rebind("rules", "explain", "--activity", "999999", cwd=tmp_path, env={})

    assert status == Exit.NOT_FOUND
    assert "has no activity 999999" in one_line(err) and "check the id" in err


@pytest.mark.parametrize("command", [("rules", "explain", "--activity", "1"), ("backfill", "--since", "2026-01-01")])
async def test_a_wrong_webhook_code_says_to_fix_rest_url_exit_5(tmp_path: Path, portal: FakePortal,
                                                                redis_url: str, command: tuple[str, ...]) -> None:
    rules_file(tmp_path, portal.rest_url.replace(portal.webhook_code, "wrongcode"))

    status, _, err = await b24rebind(*command, cwd=tmp_path, env={"REDIS_URL": redis_url})

    assert status == Exit.PORTAL_ACCESS
    line = one_line(err)
    assert "NO_AUTH_FOUND" in line and "put its URL in rest_url" in line and "wrongcode" not in line


async def test_an_unreachable_portal_says_so_exit_4(tmp_path: Path) -> None:
    rules_file(tmp_path, f"http://127.0.0.1:{closed_port()}/rest/1/code/")

    status, _, err = await b24rebind("rules", "explain", "--lead", "5", cwd=tmp_path, env={})

    assert status == Exit.PORTAL_DOWN
    assert "the portal could not be reached" in one_line(err) and "try again" in err


async def test_rule_tests_naming_a_missing_rules_file_fail(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(DEFAULT_RULES)  # the file it must not fall back to
    (tmp_path / "cases.yaml").write_text("rules: no-such-rules.yaml\ncases:\n  - name: x\n"
                                         "    activity: {bound_to: [lead 1]}\n    expect: [lead 1]\n")

    status, out, err = await b24rebind("rules", "test", "cases.yaml", cwd=tmp_path, env={})

    assert status == Exit.NOT_FOUND and "passed" not in out
    assert "name the rules file" in one_line(err) and "no-such-rules.yaml, which does not exist" in err


async def test_undo_of_an_unknown_job_says_there_is_none(tmp_path: Path, redis_url: str, redis: object) -> None:
    rules_file(tmp_path, "https://acme.bitrix24.com/rest/1/code/")

    status, _, err = await b24rebind("undo", "nosuchjob", cwd=tmp_path, env={"REDIS_URL": redis_url})

    assert status == Exit.NOT_FOUND
    assert one_line(err).startswith("b24rebind: no job 'nosuchjob'")


async def test_ctrl_c_in_backfill_stops_cleanly(tmp_path: Path, portal: FakePortal, redis_url: str,
                                                redis: object) -> None:
    for _ in range(30):
        lead = portal.add_lead()
        portal.add_activity([(LEAD, lead)])
        portal.convert_lead(lead)
    rules_file(tmp_path, portal.rest_url)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "backfill", "--since", "2000-01-01", cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "B24_DATA_DIR": str(tmp_path), "REDIS_URL": redis_url},
        # As from a terminal: Ctrl-C is not ignored (a child inherits an ignored SIGINT from whoever runs the tests).
        preexec_fn=as_from_a_terminal)
    assert process.stdout is not None
    async with ended_async(process):
        first = await asyncio.wait_for(process.stdout.readline(), timeout=60)
        assert b"queued" in first
        portal.stall_next(100, 30.0)  # the portal is slow: Ctrl-C comes while jobs wait for its answers
        await until(lambda: portal.stalls_left < 100, 60, "a request to the portal to stall")
        assert process.returncode is None, await process.communicate()
        os.kill(process.pid, signal.SIGINT)
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)

    assert process.returncode == Exit.INTERRUPTED
    text = err.decode()
    assert "Traceback" not in text and "Unclosed" not in text, text
    assert "b24rebind: interrupted (Ctrl-C); nothing queued is lost" in text


async def test_a_backfill_ends_with_its_bar_full_and_a_summary(tmp_path: Path, portal: FakePortal, redis_url: str,
                                                               redis: object) -> None:
    for _ in range(3):
        lead = portal.add_lead()
        portal.add_activity([(LEAD, lead)])
        portal.convert_lead(lead)
    rules_file(tmp_path, portal.rest_url, extra="    rate_limit: {per_second: 1000, burst: 1000}\n")

    status, out, err = await b24rebind("backfill", "--since", "2000-01-01", "--dry-run", cwd=tmp_path,
                                       env={"REDIS_URL": redis_url})

    assert status == 0, err
    assert err.strip().split("\r")[-1] == "[##############################] 3/3"
    assert "dry run: would re-bind 3 activities (nothing was written;" in out
    status, out, _ = await b24rebind("jobs", "list", "--state", "undone", cwd=tmp_path, env={"REDIS_URL": redis_url})
    assert status == 0 and out.strip() == "no jobs match these filters"


async def test_the_redis_password_never_reaches_the_message(tmp_path: Path) -> None:
    port = closed_port()

    status, out, err = await b24rebind("jobs", "list", cwd=tmp_path,
                                       env={"REDIS_URL": f"redis://:s3cretpassw0rd@127.0.0.1:{port}/0"})

    assert status == Exit.REDIS_DOWN and f"127.0.0.1:{port}" in one_line(err)
    assert "s3cretpassw0rd" not in out + err
