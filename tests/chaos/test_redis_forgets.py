"""Redis restarted empty mid-conversion (a lost volume, a failover to an empty replica): every process
notices and says so once, and one sweep puts right every activity of every accepted event, with no
operator action. Untimed: it waits on the outcome with a generous deadline.

`serve` and two workers, each with a data directory of its own, the reconcile cron off
(B24_RECONCILE_INTERVAL=0), so the only repair is the sweep after forgetting.
"""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import aiohttp
import pytest

from app.fakeportal import FakePortal
from app.store.bundled_redis import BundledRedis
from tests.support.chaos import answers, assert_every_activity_ended_right, streaming_through_a_big_conversion
from tests.support.processes import ServiceProcess, WorkerProcess, free_port, write_rules
from tests.support.waiting import until

pytestmark = pytest.mark.slow

BIG_LEAD = 300  # activities of the conversion Redis forgets in the middle of
FORGOT = "Redis forgot this installation's data"
SWEPT = "reconcile after Redis forgot"


def restart_empty(server: BundledRedis) -> None:
    """Stop redis-server, lose its files, start it again: it answers with nothing in it."""
    server.stop()
    for path in server.data_dir.iterdir():
        if path.name.startswith(("appendonly", "dump")):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    server.start()


def ended_right(portal: FakePortal) -> bool:
    try:
        assert_every_activity_ended_right(portal)
    except AssertionError:
        return False
    return True


async def test_redis_restarted_empty_mid_conversion_is_noticed_and_put_right_by_one_sweep(
    private_redis: BundledRedis, portal: FakePortal, tmp_path: Path
) -> None:
    rules = write_rules(tmp_path / "rules.yaml", portal, per_second=200, burst=100)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    homes = {name: tmp_path / name for name in ("web", "worker0", "worker1")}
    for home in homes.values():
        home.mkdir()
    web = ServiceProcess("serve", private_redis.url, rules, homes["web"], "serve", B24_PORT=str(port))
    workers = [WorkerProcess(private_redis.url, rules, homes[f"worker{i}"], f"worker{i}") for i in range(2)]
    processes = [web.start(), *(worker.start() for worker in workers)]
    try:
        async with aiohttp.ClientSession() as session:
            await until(lambda: answers(session, url + "/healthz"), 60, "the web process")

            async def all_have_looked() -> bool:  # each process knows what Redis held before it forgets
                return all((home / "redis-memory.json").exists() for home in homes.values())

            await until(all_have_looked, 60, "every process's first look at Redis")
            events_url = url + "/bitrix/events"
            async with streaming_through_a_big_conversion(portal, session, events_url, BIG_LEAD) as stream:
                await asyncio.to_thread(restart_empty, private_redis)
                await asyncio.sleep(3)  # events keep coming into the empty Redis

            async def repaired() -> bool:
                return ended_right(portal)

            await until(repaired, 240, "every activity to end right after Redis forgot")
    finally:
        logs = {process.log.name: process.log.read_text(errors="replace") for process in processes}
        for process in processes:
            await asyncio.to_thread(process.kill)

    print(f"\nRedis forgot mid-conversion: {stream.sent} events, {len(stream.accepted)} accepted "
          f"({stream.spooled} spooled), {portal.request_count} portal requests")
    assert not stream.refused, stream.refused[:5]
    assert_every_activity_ended_right(portal)
    for name, text in logs.items():
        assert text.count(FORGOT) == 1, f"{name} said it {text.count(FORGOT)} times:\n{text[-3000:]}"
        assert "Traceback" not in text, f"{name}:\n{text[-3000:]}"
    assert sum(text.count(SWEPT) for text in logs.values()) == 1, "one sweep after forgetting"
