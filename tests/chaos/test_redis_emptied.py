"""Redis restarted empty (its data lost) in the middle of a job under way on a real worker process: the
job's lead lock is gone, so it sends no more writes; it runs again from its record, which it saves back,
and ends right; nothing waits past a deadline, and every accepted event's job ends, saying why."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from arq.connections import ArqRedis

from app.fakeportal import LEAD, FakePortal
from app.store.bundled_redis import BundledRedis
from app.store.jobs import FINAL_STATES, JobRecord, JobState, JobStore
from app.store.queue import JobQueue, connect
from tests.support.chaos import assert_moved_once_to
from tests.support.processes import WorkerProcess, write_rules

pytestmark = pytest.mark.slow


@pytest.fixture
async def pool(private_redis: BundledRedis) -> AsyncIterator[ArqRedis]:
    redis = await connect(private_redis.url, wait=False)
    yield redis
    await redis.aclose()


def restart_empty(server: BundledRedis) -> None:
    """Stopped, its append-only files deleted, started again: a Redis that forgot everything."""
    server.stop()
    for path in server.data_dir.iterdir():
        if path.name.startswith("appendonly"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    server.start()


async def until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_a_job_under_way_when_redis_forgets_everything_ends_right_from_its_record(
        private_redis: BundledRedis, pool: ArqRedis, portal: FakePortal, tmp_path: Path) -> None:
    lead = portal.add_lead()
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(300)]
    made = portal.convert_lead(lead)
    store = JobStore(pool, 3600)
    record = JobRecord.for_event("acme", "ONCRMLEADUPDATE", lead, "1")
    await JobQueue(pool, store).submit(record)
    rules = write_rules(tmp_path / "rules.yaml", portal, per_second=2, burst=2)
    worker = WorkerProcess(private_redis.url, rules, tmp_path).start()
    try:
        async def under_way() -> bool:
            return any(len(portal.binding_history[a]) > 2 for a in activities)
        await until(under_way, 120, "the job's first unbind")
        await asyncio.to_thread(restart_empty, private_redis)
        forgotten = time.monotonic()

        async def ended() -> bool:
            try:
                current = await store.get(record.id)
            except OSError:
                return False
            return current is not None and current.state in FINAL_STATES
        await until(ended, 180, "the job to end after Redis forgot it")
        took = time.monotonic() - forgotten
        later = JobRecord.for_event("acme", "ONCRMLEADUPDATE", lead, "2")  # the service goes on
        await JobQueue(pool, store).submit(later)

        async def later_ended() -> bool:
            current = await store.get(later.id)
            return current is not None and current.state in FINAL_STATES
        await until(later_ended, 60, "a job accepted after the restart to end")
        assert worker.alive()
    finally:
        worker.stop()

    final = await store.get(record.id)
    assert final is not None and final.state == JobState.SUCCEEDED, final
    log = worker.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    print(f"\njob ended {took:.1f} s after Redis forgot it; attempts: "
          f"{[(a.outcome, (a.error or {}).get('code')) for a in final.attempts]}")
    assert_moved_once_to(portal, activities, made)
