"""Putting jobs on the arq queue, with a JSON serializer so queued jobs stay readable."""
from __future__ import annotations

import json
import time
from typing import Any

from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.constants import expires_extra_ms
from arq.jobs import serialize_job

from app.jobs import JobRecord, JobState, JobStore, QueueEntry

PROCESS_EVENT = "process_event"
LIVE_QUEUE = "arq:queue"
BACKFILL_QUEUE = "arq:queue:backfill"  # history, worked on with the portal budget live events leave over


def serialize(job: dict[str, Any]) -> bytes:
    # arq also stores a failed job's exception as its result: keep its text rather than fail.
    return json.dumps(job, separators=(",", ":"), default=repr).encode()


def deserialize(raw: bytes) -> dict[str, Any]:
    return json.loads(raw)  # type: ignore[no-any-return]


async def connect(redis_url: str) -> ArqRedis:
    settings = RedisSettings.from_dsn(redis_url)
    settings.conn_retries = 1
    return await create_pool(settings, job_serializer=serialize, job_deserializer=deserialize)


class JobQueue:
    """Accepts a job: its record first, then the queue entry, both in Redis before anyone is told."""

    def __init__(self, redis: ArqRedis, store: JobStore) -> None:
        self._redis = redis
        self.store = store

    async def submit(self, record: JobRecord) -> bool:
        """Queue a job; False when the same delivery was accepted before (nothing new is queued).

        The record and arq's job are written in one atomic step (arq's own `enqueue_job` takes three
        round trips more), so an accepted event is never half-stored.
        """
        record.queued_at = time.time()
        now_ms = int(record.queued_at * 1000)
        payload = serialize_job(PROCESS_EVENT, (record.task_args(),), {}, None, now_ms, serializer=serialize)
        entry = QueueEntry(_queue_of(record), record.id, payload, now_ms, expires_extra_ms)
        return await self.store.create(record, entry)

    async def requeue(self, record: JobRecord) -> None:
        """Queue an existing job again (a retry asked for by a person)."""
        record.state, record.error, record.outcome, record.finished_at = JobState.QUEUED, None, "", None
        await self.store.save(record)
        await self._redis.delete(f"arq:result:{record.id}")
        await self._enqueue(record)

    async def _enqueue(self, record: JobRecord) -> None:
        await self._redis.enqueue_job(PROCESS_EVENT, record.task_args(), _job_id=record.id,
                                      _queue_name=_queue_of(record))


def _queue_of(record: JobRecord) -> str:
    return BACKFILL_QUEUE if record.trigger == "backfill" else LIVE_QUEUE
