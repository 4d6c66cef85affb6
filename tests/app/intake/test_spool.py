"""The spool: events accepted while Redis is down reach the queue once it is back, once each."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from arq.connections import ArqRedis

from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
from app.intake.spool import Spool
from app.rules.model import RuleSet
from app.settings import Settings
from app.store.bundled_redis import BundledRedis
from app.store.jobs import JobRecord, JobState, JobStore
from app.store.queue import LIVE_QUEUE, JobQueue, connect
from app.web import create_app
from tests.conftest import TOKEN, post_event
from workers.main import build_worker, shutdown


@pytest.fixture
def bundled(private_redis: BundledRedis) -> BundledRedis:
    return private_redis


@pytest.fixture
def down_settings(bundled: BundledRedis, tmp_path: Path) -> Settings:
    return Settings(_env_file=None, redis_url=bundled.url, data_dir=tmp_path, rules=tmp_path / "rules.yaml")


@pytest.fixture
async def pool(bundled: BundledRedis) -> AsyncIterator[ArqRedis]:
    redis = await connect(bundled.url)
    yield redis
    await redis.aclose()


async def eventually(check: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def run_worker(settings: Settings, rules: RuleSet, redis: ArqRedis) -> None:
    worker = build_worker(settings, rules, redis, burst=True, poll_delay=0.01, handle_signals=False)
    try:
        await worker.run_check()
    finally:
        await shutdown(worker.ctx)


async def test_redis_down_spools_and_the_job_runs_once_it_is_back(
    aiohttp_client: Any,
    bundled: BundledRedis,
    down_settings: Settings,
    rules: RuleSet,
    pool: ArqRedis,
    portal: FakePortal,
) -> None:
    lead = portal.add_lead()
    made = portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    client = await aiohttp_client(create_app(down_settings, rules))
    bundled.stop()

    status, answer = await post_event(client, "ONCRMACTIVITYADD", activity)

    assert status == 200, answer
    assert answer["spooled"] is True
    lines = [
        json.loads(line)
        for path in Spool(down_settings.data_dir / "spool").segments()
        for line in path.read_text().splitlines()
    ]
    assert [(e["job_id"], e["event"], e["entity_id"]) for e in lines] == [
        (answer["job_id"], "ONCRMACTIVITYADD", activity)
    ]
    assert TOKEN not in json.dumps(lines)

    bundled.start()
    await eventually(lambda: _queued(pool, 1))
    await run_worker(down_settings, rules, pool)
    assert portal.bindings(activity) == [(CONTACT, made["contact"]), (COMPANY, made["company"])]
    assert (await JobStore(pool, 60).get(answer["job_id"])).state == JobState.SUCCEEDED  # type: ignore[union-attr]
    await eventually(lambda: _no_segments(down_settings))


async def test_the_spool_survives_a_restart_of_the_web_process(
    aiohttp_client: Any, bundled: BundledRedis, down_settings: Settings, rules: RuleSet, pool: ArqRedis
) -> None:
    client = await aiohttp_client(create_app(down_settings, rules))
    bundled.stop()
    answers = [await post_event(client, "ONCRMACTIVITYADD", n) for n in (1, 2, 3)]
    await client.close()  # the web process stops with three events on disk

    bundled.start()
    await aiohttp_client(create_app(down_settings, rules))  # a new web process drains them

    await eventually(lambda: _queued(pool, 3))
    queued = [job.job_id for job in await pool.queued_jobs()]
    assert sorted(queued) == sorted(answer["job_id"] for _, answer in answers)
    records = [await JobStore(pool, 60).get(answer["job_id"]) for _, answer in answers]
    assert [r.entity_id for r in sorted(records, key=lambda r: r.received_at)] == [1, 2, 3]  # type: ignore


async def test_a_duplicate_in_the_spool_is_queued_once(
    aiohttp_client: Any, bundled: BundledRedis, down_settings: Settings, rules: RuleSet, pool: ArqRedis
) -> None:
    client = await aiohttp_client(create_app(down_settings, rules))
    bundled.stop()
    first = await post_event(client, "ONCRMACTIVITYADD", 7)
    second = await post_event(client, "ONCRMACTIVITYADD", 7)
    assert first == second

    bundled.start()
    await eventually(lambda: _no_segments(down_settings))
    assert await pool.zcard(LIVE_QUEUE) == 1


async def test_a_record_made_just_before_redis_went_away_is_queued_by_the_drain(
    redis: ArqRedis, tmp_path: Path
) -> None:
    store = JobStore(redis, 60)
    queue = JobQueue(redis, store)
    record = JobRecord.for_event("acme", "ONCRMACTIVITYADD", 9, "1")
    await store.create(record)  # the record was written, the arq enqueue was not
    spool = Spool(tmp_path)
    await spool.append(record)
    await spool.append(record)

    assert await spool.drain(queue, redis) == 1
    assert [job.job_id for job in await redis.queued_jobs()] == [record.id]
    assert not spool.pending()


async def test_a_segment_another_process_is_writing_is_left_alone(redis: ArqRedis, tmp_path: Path) -> None:
    writer, drainer = Spool(tmp_path), Spool(tmp_path)
    await writer.append(JobRecord.for_event("acme", "ONCRMACTIVITYADD", 9, "1"))

    assert await drainer.drain(JobQueue(redis, JobStore(redis, 60)), redis) == 0
    assert writer.pending()
    writer.seal()
    assert await drainer.drain(JobQueue(redis, JobStore(redis, 60)), redis) == 1


async def test_a_torn_last_line_is_skipped(redis: ArqRedis, tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    await spool.append(JobRecord.for_event("acme", "ONCRMACTIVITYADD", 9, "1"))
    spool.seal()
    with spool.segments()[0].open("ab") as file:
        file.write(b'{"job_id": "abc", "por')  # the process died mid-write; that event got no answer

    assert await spool.drain(JobQueue(redis, JobStore(redis, 60)), redis) == 1


async def _queued(redis: ArqRedis, n: int) -> bool:
    try:
        return int(await redis.zcard(LIVE_QUEUE)) == n
    except OSError:
        return False


async def _no_segments(settings: Settings) -> bool:
    return not Spool(settings.data_dir / "spool").pending()


async def test_lines_that_cannot_become_jobs_are_quarantined_and_draining_goes_on(
    redis: ArqRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path)
    good = [JobRecord.for_event("acme", "ONCRMACTIVITYADD", n, "1") for n in (1, 2, 3)]
    await spool.append(good[0])
    spool.seal()
    poisoned = b'{"job_id":"p01","portal":"acme","event":"ONCRMACTIVITYADD","entity_id":"not a number"}\n'
    with spool.segments()[0].open("ab") as file:  # valid JSON with a bad field, then a line that is not JSON
        file.write(poisoned + b"\x00garbage\n")
    await spool.append(good[1])
    spool.seal()
    with spool.segments()[-1].open("ab") as file:
        file.write(b'{"job_id": "torn", "por')  # a process died mid-write; that event got no answer
    await spool.append(good[2])  # a later segment still drains

    assert await spool.drain(JobQueue(redis, JobStore(redis, 60)), redis) == 3

    assert {r.id for r in good} <= {m.decode() for m in await redis.zrange(LIVE_QUEUE, 0, -1)}
    assert spool.quarantine.read_bytes() == poisoned + b"\x00garbage\n" + b'{"job_id": "torn", "por\n'
    assert spool.status() == {"waiting_segments": 0, "quarantined": 3}
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and "quarantine.jsonl" in errors[0].getMessage()  # one line per segment
    assert float(await redis.hget("b24:metrics", "spool_quarantined")) == 3


async def test_a_torn_tail_is_cut_before_the_next_append(redis: ArqRedis, tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first, second = (JobRecord.for_event("acme", "ONCRMACTIVITYADD", n, "1") for n in (1, 2))
    await spool.append(first)
    with spool.segments()[0].open("ab") as file:
        file.write(b'{"job_id": "half a li')  # as a write that failed part-way (a full disk) leaves it

    await spool.append(second)  # would be glued to the torn line, and lost with it

    assert await spool.drain(JobQueue(redis, JobStore(redis, 60)), redis) == 2
    assert spool.status()["quarantined"] == 0


async def test_readyz_and_metrics_count_quarantined_lines(client: Any, redis: ArqRedis, settings: Settings) -> None:
    spool_dir = settings.data_dir / "spool"
    (spool_dir / "spool-00000000000000000001-1.jsonl").write_bytes(b'{"job_id": 7}\n')

    await eventually(lambda: _quarantined(client))

    response = await client.get("/metrics")
    assert "b24rebind_spool_quarantined_total 1.0" in await response.text()


async def _quarantined(client: Any) -> bool:
    answer = await (await client.get("/readyz")).json()
    return bool(answer["spool"]["quarantined"] == 1 and answer["spool"]["waiting_segments"] == 0)


async def test_reads_while_redis_is_away_are_a_503_that_says_so(
    aiohttp_client: Any, bundled: BundledRedis, down_settings: Settings, rules: RuleSet, caplog: Any
) -> None:
    client = await aiohttp_client(create_app(down_settings, rules))
    bundled.stop()

    # /metrics answers b24rebind_redis_up 0 instead (tests/app/api/test_metrics.py), for the alerts
    for path in ("/api/jobs", "/api/jobs/abc"):
        response = await client.get(path)
        assert response.status == 503, path
        assert "Redis is" in (await response.json())["error"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
