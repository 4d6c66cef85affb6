"""The bundled Redis: starts from nothing, keeps queued jobs across a restart."""
from __future__ import annotations

from pathlib import Path

from app.store.bundled_redis import BundledRedis
from app.store.jobs import JobRecord, JobStore
from app.store.queue import JobQueue, connect


async def test_a_queued_job_survives_a_restart_of_the_bundled_redis(tmp_path: Path) -> None:
    server = BundledRedis(tmp_path / "var")
    redis = await connect(server.start())
    queue = JobQueue(redis, JobStore(redis, 3600))
    record = JobRecord.for_event("acme", "ONCRMACTIVITYADD", 5, "1")
    await queue.submit(record)
    await redis.aclose()
    server.stop()

    restarted = BundledRedis(tmp_path / "var")
    redis = await connect(restarted.start())
    try:
        assert await redis.zcard("arq:queue") == 1
        assert (await JobStore(redis, 3600).get(record.id)) == record
        assert (tmp_path / "var" / "appendonly.aof").exists()
    finally:
        await redis.aclose()
        restarted.stop()


def test_a_second_process_reuses_the_running_server(tmp_path: Path) -> None:
    first = BundledRedis(tmp_path)
    url = first.start()
    try:
        second = BundledRedis(tmp_path)
        assert second.start() == url
        assert second._process is None
    finally:
        first.stop()
