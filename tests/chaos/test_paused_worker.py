"""A worker paused past its lead's lock (SIGSTOP, then SIGCONT once another worker has the lead) sends
no write once it resumes: each write call checks the lock's token first (redis-py's `Lock.owned`)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from arq.connections import ArqRedis

from app.fakeportal import LEAD, FakePortalHost
from app.store.jobs import JobRecord, JobState, JobStore
from app.store.namespace import prefixed
from app.store.queue import JobQueue
from tests.conftest import DEFAULT_RULES, DOMAIN, TOKEN
from tests.support.chaos import assert_moved_once_to
from tests.support.processes import ServiceProcess, WorkerProcess

pytestmark = pytest.mark.slow  # real processes, and a wait past the lock's 15 s lease

WRITES = (b"binding.add", b"binding.delete")


async def until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def pause(worker: ServiceProcess, sig: int) -> None:
    assert worker.process is not None
    os.kill(worker.process.pid, sig)  # the whole process: its event loop, its timers, its renewals


def rules_for(path: Path, rest_url: str) -> Path:
    path.write_text(f"""
portals:
  acme:
    domain: {DOMAIN}
    rest_url: {rest_url}
    application_token: {TOKEN}
    rate_limit: {{per_second: 1, burst: 1}}
{DEFAULT_RULES}""")
    return path


async def test_a_worker_paused_past_its_lock_sends_no_write_once_it_resumes(
        redis: ArqRedis, redis_url: str, tmp_path: Path) -> None:
    host = FakePortalHost()
    portal = host.add("first", webhook_code="code", per_second=None)
    host.alias("second", portal)  # one portal, one address per worker: the test tells who sent what
    await host.start()
    host.served = []
    lead = portal.add_lead()
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(300)]
    made = portal.convert_lead(lead)  # the portal copies them: 300 unbinds left, 6 calls at one a second
    store = JobStore(redis, 3600)
    record = JobRecord.for_event("acme", "ONCRMLEADUPDATE", lead, "1")
    await JobQueue(redis, store).submit(record)
    lock_key = prefixed(f"b24:lock:acme:lead:{lead}")
    paused = WorkerProcess(redis_url, rules_for(tmp_path / "a.yaml", host.rest_url_of("first")), tmp_path,
                           "paused").start()
    other = WorkerProcess(redis_url, rules_for(tmp_path / "b.yaml", host.rest_url_of("second")), tmp_path, "other")
    try:
        async def first_unbind() -> bool:
            return any(len(portal.binding_history[a]) > 2 for a in activities)
        await until(first_unbind, 120, "the paused worker's first unbind")
        pause(paused, signal.SIGSTOP)

        async def lock_lapsed() -> bool:
            return not await redis.exists(lock_key)
        await until(lock_lapsed, 60, "the lead's lock to lapse")
        other.start()

        async def taken_over() -> bool:
            return bool(await redis.exists(lock_key))
        await until(taken_over, 60, "the other worker to take the lead")
        resumed_at = time.monotonic()
        pause(paused, signal.SIGCONT)

        async def done() -> bool:
            current = await store.get(record.id)
            return current is not None and current.state == JobState.SUCCEEDED

        await until(done, 120, "the job to succeed on the other worker")

        def late() -> list[bytes]:
            assert host.served is not None
            return [body for name, at, body in host.served if name == "first" and at > resumed_at
                    and any(write in body for write in WRITES)]

        async def paused_one_acted() -> bool:  # it found its lock gone, or (the bug) sent its writes
            return "writes were not sent" in paused.log.read_text() or bool(late())
        await until(paused_one_acted, 60, "the resumed worker to go on")
        assert late() == [], f"{len(late())} write calls sent by the worker that no longer held the lead"
        assert paused.alive()
    finally:
        paused.kill(signal.SIGKILL)
        other.stop()
        await host.close()

    assert any(name == "second" and any(w in body for w in WRITES) for name, _, body in host.served)
    assert_moved_once_to(portal, activities, made)
