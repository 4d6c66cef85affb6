"""Noticing a Redis that forgot: the marker, the run id, and what a process keeps in its data directory."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from arq.connections import ArqRedis

from app.store.amnesia import AFTER_FORGETTING, MARKER_KEY, RedisMemory, SweepMarks, watching_redis_memory
from app.store.bundled_redis import BundledRedis
from app.store.queue import LIVE_QUEUE, connect


async def test_a_first_look_leaves_a_marker_and_a_flush_is_noticed(redis: ArqRedis, tmp_path: Path) -> None:
    memory = RedisMemory("web", tmp_path)

    assert await memory.check(redis) is None  # nothing known yet: the marker is made, nothing was lost
    assert await redis.get(MARKER_KEY) is not None
    assert await memory.check(redis) is None

    await redis.flushdb()
    forgetting = await memory.check(redis)

    assert forgetting is not None and forgetting.why.startswith("its data was flushed (FLUSHALL, FLUSHDB)")
    assert await memory.check(redis) is None  # said once


async def test_a_process_that_finds_the_marker_made_anew_by_another_knows_too(redis: ArqRedis,
                                                                              tmp_path: Path) -> None:
    web, worker = RedisMemory("web", tmp_path / "web"), RedisMemory("worker", tmp_path / "worker")
    assert await web.check(redis) is None and await worker.check(redis) is None
    await redis.flushdb()

    first, second = await web.check(redis), await worker.check(redis)

    assert first is not None and second is not None and first.marker == second.marker
    assert second.why.startswith("its marker changed: another process found Redis empty first")


async def test_a_process_started_again_knows_what_redis_held_before(redis: ArqRedis, tmp_path: Path) -> None:
    assert await RedisMemory("worker", tmp_path).check(redis) is None
    await redis.flushdb()  # while the process was stopped

    forgetting = await RedisMemory("worker", tmp_path).check(redis)  # the same data directory

    assert forgetting is not None and forgetting.why.endswith("since this process last ran")
    assert await RedisMemory("web", tmp_path / "elsewhere").check(redis) is None  # never knew: no alarm


@pytest.fixture
async def pool(private_redis: BundledRedis) -> AsyncIterator[ArqRedis]:
    redis = await connect(private_redis.url)
    yield redis
    await redis.aclose()


async def test_a_restart_that_keeps_the_data_is_not_forgetting_and_one_without_it_is(
    private_redis: BundledRedis, pool: ArqRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "app.store.amnesia")
    memory = RedisMemory("worker", tmp_path)
    assert await memory.check(pool) is None

    private_redis.stop()  # the bundled Redis keeps an append-only file
    private_redis.start()
    assert await memory.check(pool) is None
    assert "Redis restarted (its run id changed) and kept this installation's data" in caplog.text

    private_redis.stop()
    for path in private_redis.data_dir.iterdir():  # a lost volume
        if path.name.startswith(("appendonly", "dump")):
            (path.unlink() if path.is_file() else [p.unlink() for p in path.iterdir()])
    private_redis.start()
    forgetting = await memory.check(pool)

    assert forgetting is not None and forgetting.why.startswith("it restarted, with a new run id, without")


async def test_two_processes_noticing_one_forgetting_queue_one_sweep_and_say_it_once_each(
    redis: ArqRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with watching_redis_memory(redis, "web", tmp_path / "web"), \
            watching_redis_memory(redis, "worker", tmp_path / "worker"):
        await _until(lambda: redis.exists(MARKER_KEY))
        await asyncio.sleep(0.1)  # both have looked
        await redis.flushdb()
        await _until(lambda: _errors(caplog, 2), timeout=15)
        await asyncio.sleep(2.5)  # another look each: nothing more is said
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and {e.split(":")[0] for e in errors} == {"web", "worker"}, errors
    assert all("What may be lost: jobs queued, running or waiting to retry" in e for e in errors)
    queued = [job.job_id for job in await redis.queued_jobs(queue_name=LIVE_QUEUE)]
    assert len(queued) == 1 and queued[0].startswith(AFTER_FORGETTING + ":"), queued


async def _errors(caplog: pytest.LogCaptureFixture, count: int) -> bool:
    return len([r for r in caplog.records if r.levelname == "ERROR"]) >= count


async def _until(check: object, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_the_sweep_marks_survive_in_the_data_directory(tmp_path: Path) -> None:
    SweepMarks(tmp_path).save("acme", "2026-12-04T10:00:00+00:00", "2026-12-04T10:05:00+00:00")

    assert SweepMarks(tmp_path).last("acme") == {"since": "2026-12-04T10:00:00+00:00",
                                                 "cursor": "2026-12-04T10:05:00+00:00"}
    assert SweepMarks(tmp_path).last("other") == {}
    (tmp_path / "reconcile-marks" / "acme.json").write_text("{torn")
    assert SweepMarks(tmp_path).last("acme") == {}


async def test_a_restart_without_the_append_only_file_counts_as_forgetting_even_with_the_marker_back(
    private_redis: BundledRedis, pool: ArqRedis, tmp_path: Path
) -> None:
    """Back from its last snapshot: the marker (written long before) is there, the jobs since are not."""
    memory = RedisMemory("worker", tmp_path)
    assert await memory.check(pool) is None
    await pool.config_set("appendonly", "no")
    memory.run_id = "0" * 40  # as this process knew the server before the restart (the bundled one keeps its AOF)

    forgetting = await memory.check(pool)

    assert forgetting is not None and "its append-only file is off (appendonly no): what was written after its " \
                                      "last snapshot is gone" in forgetting.why
    assert await memory.check(pool) is None  # said once


async def test_a_failover_to_a_replica_is_a_warning_with_a_sweep_not_redis_forgetting(tmp_path: Path) -> None:
    """A promoted replica has a new run id and, without its own append-only file, looks like a Redis
    restarted from a snapshot; it holds the data, so only what the old primary had not copied is missing."""
    from tests.support.replication import ReplicatedRedis

    servers = ReplicatedRedis(tmp_path).start()
    try:
        memory = RedisMemory("web", tmp_path / "data")
        primary = await connect(f"redis://127.0.0.1:{servers.primary.port}/0")
        replica = await connect(f"redis://127.0.0.1:{servers.replica.port}/0")
        assert await memory.check(primary) is None
        servers.wait_for(lambda: servers.replica.client().exists(MARKER_KEY), "the marker on the replica")

        servers.primary.stop()
        await replica.execute_command("REPLICAOF", "NO", "ONE")  # what Sentinel does to promote it
        forgetting = await memory.check(replica)

        assert forgetting is not None and forgetting.failover
        assert forgetting.why.startswith("it failed over to a replica")
        await primary.aclose()
        await replica.aclose()
    finally:
        servers.stop()
