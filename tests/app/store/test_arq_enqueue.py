"""The one script that writes a job's record and arq's job together (`app/store/jobs.py`, `_CREATE_QUEUED`,
fed by `JobQueue.submit`), pinned to the arq installed: it must write what arq's own `enqueue_job` writes,
and a real arq `Worker` must run it. A new arq that lays out its keys or serializes its jobs otherwise
fails here, before it fails in production (docs/architecture.md, "Accepted = stored")."""
from __future__ import annotations

import asyncio
from typing import Any

from arq import Worker, func
from arq.connections import ArqRedis
from arq.constants import expires_extra_ms, job_key_prefix
from arq.jobs import Job, JobStatus, deserialize_job

from app.store.jobs import JobRecord, JobStore
from app.store.queue import LIVE_QUEUE, PROCESS_EVENT, JobQueue, connect, deserialize, serialize


def arq_keys(keys: list[bytes], job_id: str) -> set[str]:
    return {key.decode().replace(job_id, "<id>") for key in keys if key.decode().startswith("arq:")}


async def test_the_script_writes_what_arqs_enqueue_job_writes(redis: ArqRedis) -> None:
    record = JobRecord.for_event("acme", "ONCRMACTIVITYADD", 7, "1766047124")
    assert await JobQueue(redis, JobStore(redis, 3600)).submit(record)
    ours = set(await redis.keys("*"))
    twin = "twin-" + record.id
    assert await redis.enqueue_job(PROCESS_EVENT, record.task_args(), _job_id=twin, _queue_name=LIVE_QUEUE)
    arqs = set(await redis.keys("*")) - ours

    assert arq_keys(list(ours), record.id) - {LIVE_QUEUE} == arq_keys(list(arqs), twin) == {job_key_prefix + "<id>"}
    script_job = deserialize_job(await redis.get(job_key_prefix + record.id), deserializer=deserialize)
    arq_job = deserialize_job(await redis.get(job_key_prefix + twin), deserializer=deserialize)
    assert (script_job.function, script_job.args, script_job.kwargs, script_job.job_try) == \
        (arq_job.function, arq_job.args, arq_job.kwargs, arq_job.job_try) == \
        (PROCESS_EVENT, [record.task_args()], {}, None)  # a JSON list: our serializer's, both ways
    # Due now, kept as long: the same score (its enqueue time) and the same expiry, give or take the moments between.
    assert abs(script_job.enqueue_time.timestamp() - arq_job.enqueue_time.timestamp()) < 60
    for job_id, job in ((record.id, script_job), (twin, arq_job)):
        assert await redis.zscore(LIVE_QUEUE, job_id) == int(job.enqueue_time.timestamp() * 1000)
        assert expires_extra_ms - 60_000 < await redis.pttl(job_key_prefix + job_id) <= expires_extra_ms


async def test_a_real_arq_worker_runs_the_scripts_job(redis: ArqRedis, redis_url: str) -> None:
    record = JobRecord.for_event("acme", "ONCRMACTIVITYADD", 8, "1766047124")
    assert await JobQueue(redis, JobStore(redis, 3600)).submit(record)
    ran: list[dict[str, Any]] = []

    async def process_event(ctx: dict[str, Any], job: dict[str, Any]) -> str:
        ran.append(job)
        return "succeeded"

    pool = await connect(redis_url)
    worker = Worker(functions=[func(process_event, name=PROCESS_EVENT)], redis_pool=pool, queue_name=LIVE_QUEUE,
                    burst=True, poll_delay=0.05, handle_signals=False, keep_result=3600,
                    job_serializer=serialize, job_deserializer=deserialize)
    try:
        async with asyncio.timeout(30):
            assert await worker.run_check() == 1
    finally:
        await pool.aclose()

    assert ran == [record.task_args()]
    job = Job(record.id, redis, _queue_name=LIVE_QUEUE, _deserializer=deserialize)
    async with asyncio.timeout(10):
        assert await job.status() is JobStatus.complete
        info = await job.result_info()
    assert info is not None and info.success and info.result == "succeeded" and info.job_try == 1
