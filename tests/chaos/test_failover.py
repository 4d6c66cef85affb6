"""Redis fails over under load (Sentinel, primary `kill -9`'d): with B24_REDIS_MIN_REPLICAS=1 nothing
accepted is lost.

The scenario is in tests/support/failover.py: a primary, a replica and three Sentinels, `serve` and two
workers as processes, the fake portal, events at a steady rate and the primary killed partway, with the
replica a second behind (its link stalled): without the wait, the events of that second are lost. The
issue asks for 200 events/s for 30 s with the kill at 10 s; the shared 2-core machine this suite runs
on does 50/s for 15 s with the kill at 5 s by default. The issue's figures:
`B24_FAILOVER_RATE=200 B24_FAILOVER_SECONDS=30 B24_FAILOVER_KILL_AT=10 .venv/bin/pytest -s tests/chaos/test_failover.py`.
What a layout without the replica wait loses is counted by running the scenario as a script (see its
docstring); docs/operations.md has the figures.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from app.fakeportal import FakePortal
from tests.support.failover import run_failover
from tests.support.replication import sentinel_binary, server_binary

RATE = float(os.environ.get("B24_FAILOVER_RATE", "50"))
SECONDS = float(os.environ.get("B24_FAILOVER_SECONDS", "15"))
KILL_AT = float(os.environ.get("B24_FAILOVER_KILL_AT", "5"))

pytestmark = pytest.mark.slow


async def test_with_a_replica_wait_every_event_answered_200_survives_the_primary_being_killed(
        portal: FakePortal, tmp_path: Path) -> None:
    server_binary(), sentinel_binary()  # on CI a missing one fails here; elsewhere the test skips, saying why
    run = await run_failover(tmp_path, portal, min_replicas=1, rate=RATE, seconds=SECONDS, kill_at=KILL_AT)
    print("\n" + run.summary())

    assert run.alive, {name: text[-2000:] for name, text in run.logs.items()}
    assert not run.refused, run.refused[:5]  # Redis away or unconfirmed: spooled, never refused
    assert run.accepted, "no event was accepted"
    assert not [job for job, state in run.states.items() if state in ("failed", "dead")], "a job gave up"
    assert run.wrong == [], f"activities left wrong: {run.wrong[:10]}"
    assert run.changed_twice == [], f"activities changed twice: {run.changed_twice[:10]}"
    for name, text in run.logs.items():
        assert "Traceback" not in text, f"{name}:\n{text[-3000:]}"
        # Each process says in one line that Redis failed over, and to where.
        assert re.search(r"Redis failed over: the Sentinels name 127\.0\.0\.1:\d+ as primary", text), \
            f"{name}:\n{text[-3000:]}"
    assert set(run.exits.values()) == {0}, run.exits
    # A command finds the new primary through the Sentinels as well, and reads a finished job there
    # ("skipped" when the sweep after the failover had put its activity right first).
    assert json.loads(run.command)["state"] in ("succeeded", "skipped"), run.command
    # Every event answered 200 ends as a finished job. (A delivery whose first try died with the old
    # primary, spooled, was once dropped as "seen before" because arq kept an "expired" result for it.)
    assert run.lost == [], f"{len(run.lost)} accepted events lost: {[(j, run.states[j]) for j in run.lost[:10]]}"
