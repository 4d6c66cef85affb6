"""Which worker processes are online: each worker says so in Redis every few seconds, with what it is doing.

arq's own health-check key is one key per queue that the last worker to write it owns (and written hourly
by default), so it cannot say how many processes run. Each worker (one per queue in a process) keeps a
hash of its own that expires unless renewed, listed in a sorted set by the time of its last beat; a
reader drops the entries whose hash has expired. A killed process disappears within `TTL` seconds.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.store.namespace import prefixed

log = logging.getLogger(__name__)

WORKERS = "b24:workers"  # sorted set: worker id -> Unix time of its last beat
WORKER = "b24:worker:"  # + worker id -> hash: host, pid, queue, started_at, seen_at, running, capacity, ...
EVERY = 5.0  # seconds between beats
TTL = 15  # seconds a beat counts: three missed beats and the worker is gone


class BeatingWorker(Protocol):
    """What a beat reads from an arq Worker (all public attributes of arq's Worker)."""

    queue_name: str
    max_jobs: int
    tasks: dict[str, asyncio.Task[Any]]
    jobs_complete: int
    jobs_failed: int
    jobs_retried: int


def worker_id(queue: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{queue}"


async def beat(redis: Redis, worker: BeatingWorker, started_at: float) -> None:
    """One beat: the worker's hash, renewed for TTL seconds, and its place in the list."""
    now = time.time()
    ident = worker_id(worker.queue_name)
    fields = {"host": socket.gethostname(), "pid": os.getpid(), "queue": worker.queue_name,
              "started_at": started_at, "seen_at": now, "capacity": worker.max_jobs,
              "running": sum(not task.done() for task in worker.tasks.values()),
              "complete": worker.jobs_complete, "failed": worker.jobs_failed, "retried": worker.jobs_retried}
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(prefixed(WORKER + ident), mapping=fields)
        pipe.expire(prefixed(WORKER + ident), TTL)
        pipe.zadd(prefixed(WORKERS), {ident: now})
        pipe.zremrangebyscore(prefixed(WORKERS), "-inf", now - 24 * 3600)  # long gone: keep the set small
        await pipe.execute()


@contextlib.asynccontextmanager
async def beating(redis: Redis, worker: BeatingWorker) -> AsyncIterator[None]:
    """Beat every EVERY seconds while the context is open; a beat Redis misses is skipped, not waited for.
    A worker that stops takes its hash off (it is offline at once) and leaves its last beat listed."""
    started_at = time.time()

    async def forever() -> None:
        while True:
            try:
                async with asyncio.timeout(EVERY):
                    await beat(redis, worker, started_at)
            except (RedisError, OSError, TimeoutError):
                pass  # the worker says itself that Redis is away; the hash expires meanwhile
            await asyncio.sleep(EVERY)

    task = asyncio.create_task(forever())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(RedisError, OSError, TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(2):
                await redis.delete(prefixed(WORKER + worker_id(worker.queue_name)))


async def online(redis: Redis) -> list[dict[str, Any]]:
    """The workers that beat in the last day, newest first, each `online` while its hash lives (its last
    beat under TTL seconds ago); a gone one keeps `seen_at`, so a reader can say "last seen 3 min ago"."""
    entries = await redis.zrevrange(prefixed(WORKERS), 0, 199, withscores=True)
    if not entries:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for ident, _ in entries:
            pipe.hgetall(prefixed(WORKER + ident.decode()))
        hashes = await pipe.execute()
    workers = []
    for (ident, seen), values in zip(entries, hashes, strict=True):
        fields = {key.decode(): value.decode() for key, value in values.items()}
        workers.append({"id": ident.decode(), "online": bool(fields), "seen_at": seen,
                        "host": fields.get("host"), "pid": int(fields["pid"]) if "pid" in fields else None,
                        "queue": fields.get("queue"), "running": int(fields.get("running", 0)),
                        "capacity": int(fields.get("capacity", 0)),
                        "started_at": float(fields["started_at"]) if "started_at" in fields else None,
                        "complete": int(fields.get("complete", 0)), "failed": int(fields.get("failed", 0))})
    return workers
