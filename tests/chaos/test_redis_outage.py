"""A blip is not an outage: Redis stops and starts under real processes, and nothing restarts them.

`serve` with two workers, and `run` (web and workers in one process), each under a steady stream of
events and in the middle of a 400-activity conversion, while Redis goes away for 0.2 s, 3 s and a long
while: every process is alive afterwards, every event answered 200 becomes a job that finishes, and
no activity is ever without a binding or changed twice.

The long outage is B24_LONG_OUTAGE_SECONDS (10 by default; the issue's 60 s:
`B24_LONG_OUTAGE_SECONDS=60 .venv/bin/pytest -s tests/chaos/test_redis_outage.py`).
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from arq.connections import ArqRedis

from app.fakeportal import LEAD, FakePortal
from app.store.bundled_redis import BundledRedis
from app.store.jobs import JobStore
from app.store.queue import connect
from tests.support.chaos import (
    Stream,
    all_done,
    answers,
    assert_every_activity_ended_right,
    streaming_through_a_big_conversion,
)
from tests.support.processes import (
    ServiceProcess,
    WorkerProcess,
    as_from_a_terminal,
    ended_async,
    free_port,
    write_rules,
)
from tests.support.waiting import until

LONG_OUTAGE = float(os.environ.get("B24_LONG_OUTAGE_SECONDS", "10"))
BIG_LEAD = 400  # activities of the conversion an outage falls in the middle of

pytestmark = pytest.mark.slow


@pytest.fixture
async def pool(private_redis: BundledRedis) -> AsyncIterator[ArqRedis]:
    redis = await connect(private_redis.url, wait=False)  # the test's own view survives the outage too
    yield redis
    await redis.aclose()


async def ride_out(outage: float, processes: list[ServiceProcess], web_url: str, private_redis: BundledRedis,
                   portal: FakePortal, pool: ArqRedis) -> None:
    """The scenario: a big conversion and a stream of events; Redis away for `outage` seconds mid-way."""
    async with aiohttp.ClientSession() as session:
        await until(lambda: answers(session, web_url + "/healthz"), 60, "the web process")
        events_url = web_url + "/bitrix/events"
        async with streaming_through_a_big_conversion(portal, session, events_url, BIG_LEAD) as stream:
            await asyncio.to_thread(private_redis.stop)
            await asyncio.sleep(outage)
            await asyncio.to_thread(private_redis.start)
            await asyncio.sleep(3)  # events keep coming once Redis is back
        records = await all_done(JobStore(pool, 3600), stream.accepted, timeout=180 + outage)

    logs = {process.log.name: process.log.read_text(errors="replace") for process in processes}
    print(f"\nRedis away {outage:g} s: {stream.sent} events, {len(stream.accepted)} jobs ({stream.spooled} "
          f"spooled), {portal.request_count} portal requests")
    assert all(process.alive() for process in processes), {name: text[-2000:] for name, text in logs.items()}
    assert not stream.refused, stream.refused[:5]
    assert not [r for r in records.values() if r.state.value in ("failed", "dead")], "a job gave up"
    assert_every_activity_ended_right(portal)
    for activity, history in portal.binding_history.items():
        assert len(set(history)) == len(history), f"activity {activity} was changed twice: {history}"
    for name, text in logs.items():
        assert "Traceback" not in text, f"{name}:\n{text[-3000:]}"
        # One line when Redis goes (and one when it is back) per part (web, worker) of each process. A cron
        # that fell in the outage says it skipped, in a line of its own that is not the outage's.
        parts = Counter(re.findall(r'"message":"([^"]+): Redis is unreachable \([^"]*; waiting for it', text))
        assert all(said == 1 for said in parts.values()), f"{name}: {parts}\n{text[-3000:]}"
    for process in processes:
        assert await asyncio.to_thread(process.stop) == 0, process.log.read_text(errors="replace")[-2000:]


@pytest.mark.parametrize("outage", [0.2, 3.0, LONG_OUTAGE])
async def test_serve_and_two_workers_ride_out_redis_going_away(
    outage: float, private_redis: BundledRedis, portal: FakePortal, pool: ArqRedis, tmp_path: Path
) -> None:
    rules = write_rules(tmp_path / "rules.yaml", portal, per_second=200, burst=100)
    port = free_port()
    web = ServiceProcess("serve", private_redis.url, rules, tmp_path, "serve", B24_PORT=str(port))
    workers = [WorkerProcess(private_redis.url, rules, tmp_path, f"worker{i}") for i in range(2)]
    processes = [web.start(), *(worker.start() for worker in workers)]
    try:
        await ride_out(outage, processes, f"http://127.0.0.1:{port}", private_redis, portal, pool)
    finally:
        for process in processes:
            await asyncio.to_thread(process.kill)


@pytest.mark.parametrize("outage", [0.2, 3.0, LONG_OUTAGE])
async def test_run_rides_out_redis_going_away(
    outage: float, private_redis: BundledRedis, portal: FakePortal, pool: ArqRedis, tmp_path: Path
) -> None:
    rules = write_rules(tmp_path / "rules.yaml", portal, per_second=200, burst=100)
    port = free_port()
    # The reconcile sweep (a cron in the worker) runs too, every 10 s.
    run = ServiceProcess("run", private_redis.url, rules, tmp_path, "run", B24_PORT=str(port),
                         B24_RECONCILE_INTERVAL="10")
    try:
        await ride_out(outage, [run.start()], f"http://127.0.0.1:{port}", private_redis, portal, pool)
    finally:
        await asyncio.to_thread(run.kill)


async def test_serve_and_a_worker_started_while_redis_is_down_spool_wait_and_catch_up(
    private_redis: BundledRedis, portal: FakePortal, pool: ArqRedis, tmp_path: Path
) -> None:
    rules = write_rules(tmp_path / "rules.yaml", portal, per_second=200, burst=100)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    await asyncio.to_thread(private_redis.stop)
    web = ServiceProcess("serve", private_redis.url, rules, tmp_path, "serve", B24_PORT=str(port)).start()
    worker = WorkerProcess(private_redis.url, rules, tmp_path).start()
    try:
        async with aiohttp.ClientSession() as session:
            await until(lambda: answers(session, url + "/healthz"), 60, "the web process")
            stream = Stream(portal, url + "/bitrix/events")
            for _ in range(10):
                lead = portal.add_lead()
                activity = portal.add_activity([(LEAD, lead)])
                portal.convert_lead(lead)
                await stream.post(session, "ONCRMACTIVITYADD", activity)
            async def says_redis_is_away() -> bool:
                nonlocal response, ready
                async with session.get(url + "/readyz") as response:
                    ready = await response.json()
                return response.status == 503 and ready["redis_down_seconds"] > 0

            response, ready = None, {}
            await until(says_redis_is_away, 30, "the web process to see Redis away")
            for process in (web, worker):  # each says so in its log before Redis is back (and then that it is)
                await until(lambda: "Redis is unreachable (" in process.log.read_text(errors="replace"), 60,
                            f"{process.log.name} to say Redis is away")
            await asyncio.to_thread(private_redis.start)
            records = await all_done(JobStore(pool, 3600), stream.accepted, timeout=60)
    finally:
        web_status = await asyncio.to_thread(web.stop)
        worker_status = await asyncio.to_thread(worker.stop)

    assert not stream.refused and stream.spooled == 10 == len(records), (stream.refused, stream.spooled)
    assert response.status == 503 and ready["redis"].startswith("unreachable (ConnectionError) for ")
    assert ready["redis_down_seconds"] > 0 and ready["spool"]["waiting_segments"] >= 1, ready
    assert_every_activity_ended_right(portal)
    assert (web_status, worker_status) == (0, 0)
    for log in (web.log, worker.log):
        text = log.read_text(errors="replace")
        assert "Traceback" not in text and "Redis is back after" in text, text[-3000:]


async def test_a_worker_stopped_while_redis_is_away_leaves_cleanly(
    private_redis: BundledRedis, portal: FakePortal, tmp_path: Path
) -> None:
    rules = write_rules(tmp_path / "rules.yaml", portal)
    worker = WorkerProcess(private_redis.url, rules, tmp_path).start()
    try:
        await until(lambda: "Starting worker" in worker.log.read_text(errors="replace"), 60, "the worker to start")
        await asyncio.to_thread(private_redis.stop)
        await until(lambda: "Redis is unreachable (" in worker.log.read_text(errors="replace"), 60,
                    "the worker's poll to fail and wait")
        status = await asyncio.to_thread(worker.stop)  # SIGTERM; SIGKILL (status -9) after 40 s
    finally:
        worker.kill()

    text = worker.log.read_text(errors="replace")
    assert status == 0, text[-3000:]
    assert "Traceback" not in text and "Redis is unreachable (" in text, text[-3000:]


async def test_jobs_watch_waits_for_a_restarting_redis_and_goes_on(private_redis: BundledRedis, tmp_path: Path) -> None:
    watch = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "jobs", "watch", "--interval", "0.2", cwd=tmp_path,
        env={**os.environ, "REDIS_URL": private_redis.url, "B24_DATA_DIR": str(tmp_path)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
        preexec_fn=as_from_a_terminal)  # the Ctrl-C below must not be ignored, whoever runs the tests
    out, err = bytearray(), bytearray()

    async def collect(stream: asyncio.StreamReader | None, into: bytearray) -> None:
        assert stream is not None
        while chunk := await stream.read(65536):  # read as it comes: a full pipe would stall the screen
            into += chunk

    def screens() -> int:
        return out.count("b24rebind — ".encode())

    async with ended_async(watch):
        readers = asyncio.gather(collect(watch.stdout, out), collect(watch.stderr, err))
        await until(lambda: screens() > 0, 60, "the first screen")
        await asyncio.to_thread(private_redis.stop)
        await until(lambda: b"Redis is unreachable" in err, 60, "jobs watch to say Redis is away")
        await asyncio.to_thread(private_redis.start)
        drawn_before = screens()
        await until(lambda: screens() > drawn_before, 60, "a screen drawn once Redis is back")
        assert watch.returncode is None, "jobs watch ended"
        watch.send_signal(signal.SIGINT)
        await asyncio.wait_for(watch.wait(), timeout=30)
        await asyncio.wait_for(readers, timeout=30)

    text = err.decode(errors="replace")
    assert "Traceback" not in text and text.count("Redis is unreachable") == 1, text
    assert watch.returncode == 130
