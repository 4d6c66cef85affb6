"""Workers say they are online: a beat in Redis that expires, read back for the dashboard's workers panel."""
from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from app.api import stats
from app.rules.model import RuleSet
from app.store import heartbeat
from app.store.jobs import JobStore


async def wait_for(condition: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not await condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.05)


async def test_a_running_worker_is_online_with_its_jobs_and_leaves_when_it_stops(
        redis: Any, rules: RuleSet, make_worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heartbeat, "EVERY", 0.05)
    worker = make_worker(max_jobs=7)
    busy = asyncio.get_running_loop().create_future()
    worker.tasks["job-in-hand"] = asyncio.ensure_future(busy)  # a job under way, as arq keeps it

    async with heartbeat.beating(redis, worker):
        await wait_for(lambda: _online(redis))
        workers = await workers_panel(redis, rules)
        assert workers["online"] == 1 and workers["running"] == 1
        (process,) = workers["processes"]
        assert process["pid"] == os.getpid() and process["queues"] == ["live"] and process["capacity"] == 7
        assert workers["last_seen_seconds_ago"] < 5

    busy.cancel()
    workers = await workers_panel(redis, rules)
    assert workers["online"] == 0 and workers["running"] == 0 and workers["processes"] == []
    assert workers["last_seen_seconds_ago"] is not None  # "none online; last seen 2 s ago"


async def test_a_worker_that_stops_beating_goes_offline_but_is_remembered_as_last_seen(
        redis: Any, rules: RuleSet, make_worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heartbeat, "TTL", 1)
    await heartbeat.beat(redis, make_worker(), time.time())  # one beat, then the process is killed
    assert await _online(redis)

    await wait_for(lambda: _offline(redis))
    workers = await workers_panel(redis, rules)
    assert workers["online"] == 0 and workers["last_seen"] is not None and workers["last_seen_seconds_ago"] >= 1


async def _online(redis: Any) -> bool:
    return any(w["online"] for w in await heartbeat.online(redis))


async def _offline(redis: Any) -> bool:
    return not await _online(redis)


async def workers_panel(redis: Any, rules: RuleSet) -> dict[str, Any]:
    answer: dict[str, Any] = (await stats.collect(redis, JobStore(redis, 86400), rules))["workers"]
    return answer


CHILD = """
import asyncio, sys
from app.store import heartbeat
from app.store.queue import connect

heartbeat.EVERY, heartbeat.TTL = 0.2, 1

class Worker:  # what a beat reads of arq's Worker
    queue_name, max_jobs, tasks, jobs_complete, jobs_failed, jobs_retried = "arq:queue", 5, {}, 0, 0, 0

async def main() -> None:
    redis = await connect(sys.argv[1])
    async with heartbeat.beating(redis, Worker()):
        print("beating", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_worker_process_killed_with_sigkill_leaves_the_panel_within_its_ttl(
        redis: Any, redis_url: str, rules: RuleSet) -> None:
    import signal
    import sys

    child = await asyncio.create_subprocess_exec(sys.executable, "-c", CHILD, redis_url,
                                                 stdout=asyncio.subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert (await asyncio.wait_for(child.stdout.readline(), 30)).strip() == b"beating"
        await wait_for(lambda: _online(redis))
        assert [w["pid"] for w in await heartbeat.online(redis) if w["online"]] == [child.pid]

        child.send_signal(signal.SIGKILL)  # no goodbye: only the TTL takes it off
        await asyncio.wait_for(child.wait(), 10)

        await wait_for(lambda: _offline(redis))
        workers = await workers_panel(redis, rules)
        assert workers["online"] == 0 and workers["last_seen_seconds_ago"] is not None
    finally:
        if child.returncode is None:
            child.kill()
            await asyncio.wait_for(child.wait(), 10)
