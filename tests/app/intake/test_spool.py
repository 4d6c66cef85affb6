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
    quarantined = [json.loads(line) for line in spool.quarantine.read_bytes().splitlines()]
    assert [q["text"] for q in quarantined] == [poisoned.decode(), "\x00garbage\n", '{"job_id": "torn", "por']
    assert [q["reason"] for q in quarantined][:2] == [
        "types: entity_id: Input should be a valid integer, unable to parse string as an integer",
        "JSON: Expecting value: line 1 column 1 (char 0)",
    ][:2]
    assert quarantined[2]["reason"].startswith("JSON: Unterminated string")
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


async def _drain_lines(redis: ArqRedis, tmp_path: Path, *lines: bytes) -> tuple[Spool, int]:
    spool = Spool(tmp_path)
    (tmp_path / "spool-00000000000000000001-1.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    return spool, await spool.drain(JobQueue(redis, JobStore(redis, 60)), redis)


GOOD = b'{"job_id":"g00d","portal":"acme","event":"ONCRMACTIVITYADD","entity_id":5}'


@pytest.mark.parametrize(("line", "reason"), [
    (b'{"job_id":"big","portal":"acme","event":"E","entity_id":18446744073709551617}',
     "range: entity_id 18446744073709551617 is not a positive 64-bit id"),
    (b'{"job_id":"sur","portal":"acme\\ud800","event":"E","entity_id":1}',
     "text: portal holds a lone surrogate, which is not text"),
    (b'{"job_id":"ab\\udc00","portal":"acme","event":"E","entity_id":1}',
     "text: job_id holds a lone surrogate, which is not text"),
    (b'{"job_id":"nan","portal":"acme","event":"E","entity_id":1,"received_at":NaN}',
     "range: NaN is not a number a job can hold"),
    (b'{"job_id":"inf","portal":"acme","event":"E","entity_id":1,"received_at":1e400}',
     "range: received_at inf is not a time"),
])
async def test_the_lines_that_once_stopped_the_drain_are_quarantined_with_their_reason(
    redis: ArqRedis, tmp_path: Path, line: bytes, reason: str
) -> None:
    spool, queued = await _drain_lines(redis, tmp_path, line, GOOD)

    assert queued == 1 and await redis.zrange(LIVE_QUEUE, 0, -1) == [b"g00d"]
    [entry] = [json.loads(raw) for raw in spool.quarantine.read_bytes().splitlines()]
    assert entry["reason"] == reason and entry["line"] == 1 and entry["segment"].startswith("spool-")
    assert not spool.pending()


class RefusingQueue(JobQueue):
    """A queue whose Redis answers one job's write with an error (a value it will not take)."""

    def __init__(self, redis: ArqRedis, refused: str, answer: Exception) -> None:
        super().__init__(redis, JobStore(redis, 60))
        self.refused, self.answer = refused, answer

    async def submit(self, record: JobRecord) -> bool:
        if record.id == self.refused:
            raise self.answer
        return await super().submit(record)


async def test_a_value_redis_refuses_is_quarantined_not_taken_for_an_outage(redis: ArqRedis, tmp_path: Path) -> None:
    from redis.exceptions import ResponseError

    spool = Spool(tmp_path)
    (tmp_path / "spool-00000000000000000001-1.jsonl").write_bytes(
        b'{"job_id":"refused","portal":"acme","event":"E","entity_id":1}\n' + GOOD + b"\n")
    queue = RefusingQueue(redis, "refused", ResponseError("value is not a valid float"))

    assert await spool.drain(queue, redis) == 1

    [entry] = [json.loads(raw) for raw in spool.quarantine.read_bytes().splitlines()]
    assert entry["reason"] == "Redis refused it: ResponseError: value is not a valid float"
    assert not spool.pending()


async def test_redis_refusing_every_write_is_said_once_and_the_spool_waits_for_it(
    pool: ArqRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "app.intake.spool")
    spool = Spool(tmp_path)
    (tmp_path / "spool-00000000000000000001-1.jsonl").write_bytes(GOOD + b"\n")
    await pool.config_set("maxmemory", 1)  # every write is refused: OOM command not allowed
    drainer = asyncio.create_task(spool.run_drainer(JobQueue(pool, JobStore(pool, 60)), pool, every=0.05))
    try:
        await eventually(lambda: _said(caplog, "refuses the spool's writes"))
        await asyncio.sleep(0.3)  # several rounds
        assert spool.pending() and not spool.quarantine.exists()
        await pool.config_set("maxmemory", 0)
        await eventually(lambda: _no_pending(spool))
    finally:
        drainer.cancel()
        await pool.config_set("maxmemory", 0)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "(OOM command not allowed" in warnings[0], warnings
    assert await pool.zrange(LIVE_QUEUE, 0, -1) == [b"g00d"]
    assert "Redis takes the spool's writes again" in caplog.text


async def _said(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return text in caplog.text


async def _no_pending(spool: Spool) -> bool:
    return not spool.pending()


async def test_a_segment_that_cannot_be_read_leaves_the_later_ones_to_drain(
    redis: ArqRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path)
    (tmp_path / "spool-00000000000000000001-1.jsonl").mkdir()  # open() fails on it, whoever runs the test
    (tmp_path / "spool-00000000000000000002-1.jsonl").write_bytes(GOOD + b"\n")
    queue = JobQueue(redis, JobStore(redis, 60))

    assert await spool.drain(queue, redis) == 1
    assert await spool.drain(queue, redis) == 0  # tried again, said once

    assert [p.name for p in spool.segments()] == ["spool-00000000000000000001-1.jsonl"]
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "IsADirectoryError" in errors[0].getMessage() and not errors[0].exc_info


async def test_readyz_says_degraded_while_segments_wait_and_redis_answers(
    client: Any, redis: ArqRedis, settings: Settings
) -> None:
    writer = Spool(settings.data_dir / "spool")  # another process, still writing its segment: it waits
    await writer.append(JobRecord.for_event("acme", "ONCRMACTIVITYADD", 3, "1"))

    response = await client.get("/readyz")
    answer = await response.json()
    assert response.status == 200 and answer["status"] == "degraded", answer
    assert answer["degraded"].startswith("1 spool segment of events accepted while Redis was away wait")
    stats = await (await client.get("/api/stats")).json()
    assert stats["spool"] == {"waiting_segments": 1, "quarantined": 0}

    writer.seal()
    await eventually(lambda: _ready(client))


async def _ready(client: Any) -> bool:
    return bool((await (await client.get("/readyz")).json())["status"] == "ready")
