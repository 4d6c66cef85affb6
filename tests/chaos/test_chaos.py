"""Chaos: events pour in while workers are killed, Redis restarts and the portal fails; nothing is lost.

The short form runs with the normal test run. The long form: B24_CHAOS_EVENTS=2000 (and, for the
Redis-down scenario, B24_REDIS_DOWN_EVENTS=500 B24_REDIS_DOWN_SECONDS=30) `.venv/bin/pytest -s tests/chaos`.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from arq.connections import ArqRedis

from app.fakeportal import FakePortal
from app.rules.model import RuleSet
from app.settings import Settings
from app.store.bundled_redis import BundledRedis
from app.store.jobs import JobStore
from app.store.queue import connect
from app.web import create_app
from tests.conftest import TOKEN, WEBHOOK_CODE, post_event
from tests.support.chaos import all_done, assert_every_activity_ended_right, converted_leads
from tests.support.processes import WorkerProcess, write_rules

pytestmark = pytest.mark.slow  # real processes: left out of the fast loop (`-m "not slow"`)

EVENTS = int(os.environ.get("B24_CHAOS_EVENTS", "120"))
DOWN_EVENTS = int(os.environ.get("B24_REDIS_DOWN_EVENTS", "100"))
DOWN_SECONDS = float(os.environ.get("B24_REDIS_DOWN_SECONDS", "4"))


@pytest.fixture
async def chaos_client(
    aiohttp_client: Any, private_redis: BundledRedis, rules: RuleSet, tmp_path: Path
) -> Any:
    settings = Settings(
        _env_file=None, redis_url=private_redis.url, data_dir=tmp_path, rules=tmp_path / "x.yaml"
    )
    return await aiohttp_client(create_app(settings, rules))


@pytest.fixture
async def pool(private_redis: BundledRedis) -> AsyncIterator[ArqRedis]:
    redis = await connect(private_redis.url)
    yield redis
    await redis.aclose()


class Supervisor:
    """Keeps `count` worker processes running, as systemd or compose would restart them."""

    def __init__(self, count: int, make: Any, rng: random.Random) -> None:
        self.workers = [make(f"w{i}") for i in range(count)]
        self.rng = rng
        self.kills = 0

    async def keep_running(self) -> None:
        while True:
            for worker in self.workers:
                if not worker.alive():
                    worker.start()
            await asyncio.sleep(0.3)

    async def kill_now_and_then(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            self.rng.choice(self.workers).kill(signal.SIGKILL)
            self.kills += 1

    def stop(self) -> None:
        for worker in self.workers:
            worker.kill()


async def faulty(portal: FakePortal, rng: random.Random) -> None:
    """About one request in twenty fails: mostly 500s, some QUERY_LIMIT_EXCEEDED."""
    while True:
        await asyncio.sleep(0.01)
        seen = portal.request_count
        while portal.request_count < seen + 20:
            await asyncio.sleep(0.01)
        if rng.random() < 0.8:
            portal.fail_next(1, status=500, error="INTERNAL_SERVER_ERROR")
        else:
            portal.fail_next(1, status=503, error="QUERY_LIMIT_EXCEEDED")


async def test_events_survive_killed_workers_redis_restarts_and_a_failing_portal(
    chaos_client: Any, private_redis: BundledRedis, pool: ArqRedis, portal: FakePortal, tmp_path: Path,
    rng: random.Random
) -> None:
    plan = converted_leads(portal, EVENTS, rng)
    rules_file = write_rules(tmp_path / "rules.yaml", portal, per_second=200, burst=100)
    supervisor = Supervisor(2, lambda name: WorkerProcess(private_redis.url, rules_file, tmp_path, name), rng)
    chaos = [
        asyncio.create_task(supervisor.keep_running()),
        asyncio.create_task(faulty(portal, rng)),
        asyncio.create_task(supervisor.kill_now_and_then(every=2.0)),
    ]
    started = time.monotonic()
    accepted: set[str] = set()
    spooled = 0
    restarts_at = {len(plan) // 3, 2 * len(plan) // 3}
    try:
        for number, (event, entity) in enumerate(plan):
            if number in restarts_at:  # Redis goes away for a second; events keep coming meanwhile
                await asyncio.to_thread(private_redis.stop)
                asyncio.get_running_loop().call_later(1.0, private_redis.start)
            status, answer = await post_event(chaos_client, event, entity, ts=1766047124 + number)
            assert status == 200, answer
            accepted.add(answer["job_id"])
            spooled += bool(answer.get("spooled"))
            await asyncio.sleep(0.03)
        records = await all_done(JobStore(pool, 3600), accepted, timeout=120 + EVENTS / 5)
    finally:
        for task in chaos:
            task.cancel()
        await asyncio.to_thread(supervisor.stop)
    elapsed = time.monotonic() - started

    states = [r.state.value for r in records.values()]
    print(
        f"\nchaos: {len(plan)} events, {len(accepted)} jobs ({spooled} spooled), {supervisor.kills} workers "
        f"killed, 2 Redis restarts, {portal.request_count} portal requests; all done in {elapsed:.1f} s; "
        f"states { ({s: states.count(s) for s in set(states)}) }"
    )
    assert spooled > 0
    assert not [r for r in records.values() if r.state.value in ("failed", "dead")], "a job gave up"
    assert_every_activity_ended_right(portal)
    logs = "".join(w.log.read_text(errors="replace") for w in supervisor.workers)
    assert not [s for s in (TOKEN, WEBHOOK_CODE) if s in logs], "a secret in the workers' logs"


async def test_redis_down_while_events_arrive_loses_none_of_them(
    chaos_client: Any, private_redis: BundledRedis, pool: ArqRedis, portal: FakePortal, tmp_path: Path,
    rng: random.Random
) -> None:
    plan = converted_leads(portal, DOWN_EVENTS, rng)
    rules_file = write_rules(tmp_path / "rules.yaml", portal, per_second=200, burst=100)
    worker = WorkerProcess(private_redis.url, rules_file, tmp_path, "w").start()
    supervisor = Supervisor(0, None, rng)
    supervisor.workers = [worker]
    keeper = asyncio.create_task(supervisor.keep_running())
    try:
        await asyncio.to_thread(private_redis.stop)
        down_since = time.monotonic()
        answers = []
        for number, (event, entity) in enumerate(plan):
            answers.append(await post_event(chaos_client, event, entity, ts=1766047124 + number))
            await asyncio.sleep(max(0.0, DOWN_SECONDS / len(plan) - 0.002))
        await asyncio.sleep(max(0.0, DOWN_SECONDS - (time.monotonic() - down_since)))
        await asyncio.to_thread(private_redis.start)
        back = time.monotonic()
        assert all(status == 200 and answer.get("spooled") for status, answer in answers)
        records = await all_done(
            JobStore(pool, 3600), {a["job_id"] for _, a in answers}, timeout=60 + len(plan) / 5
        )
    finally:
        keeper.cancel()
        await asyncio.to_thread(supervisor.stop)

    print(
        f"\nredis down {DOWN_SECONDS:g} s: {len(plan)} events spooled; all processed "
        f"{time.monotonic() - back:.1f} s after Redis returned"
    )
    assert len(records) == len({a["job_id"] for _, a in answers})
    assert_every_activity_ended_right(portal)
