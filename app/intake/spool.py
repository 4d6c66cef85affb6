"""The intake spool: events accepted while Redis is unreachable, kept on disk until they are queued.

A portal never re-sends an event, so when Redis cannot take a job the web process appends it to a
local file (one JSON line per event, fsync'd before the answer) and a background task moves the
lines into the queue, oldest first, once Redis answers again. Files are segments named by the time
they were opened; the one a process writes to is locked, so a drainer (in this process or another
started later) only ever reads finished segments. A line holds the job's fields and its id, never
the portal's token; queueing by job id makes a line drained twice, or spooled twice, queue once.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Any

from aiohttp import web
from arq.constants import in_progress_key_prefix, job_key_prefix
from redis.exceptions import RedisError

from app.api.keys import queue_key, redis_key, settings_key
from app.settings import Settings
from app.store.jobs import JobRecord, JobState
from app.store.queue import JobQueue

log = logging.getLogger(__name__)

SUFFIX = ".jsonl"
DRAIN_EVERY = 1.0  # seconds between looks at the spool while it holds events
FIELDS = (
    "job_id",
    "portal",
    "event",
    "entity_id",
    "event_ts",
    "trigger",
    "only_rule",
    "dry_run",
    "received_at",
)


def spool_dir(settings: Settings) -> Path:
    return settings.spool_dir or settings.data_dir / "spool"


class Spool:
    """Appends events to the current segment (fsync'd) and drains finished segments into a JobQueue."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._file: IO[bytes] | None = None
        self._lock = threading.Lock()  # appends come from worker threads; keep lines whole and ordered
        self.directory.mkdir(parents=True, exist_ok=True)

    async def append(self, record: JobRecord) -> None:
        """Write the job to disk and fsync it; raises OSError when the disk cannot take it."""
        line = (
            json.dumps(
                {
                    "job_id": record.id,
                    **{k: v for k, v in record.task_args().items() if k != "job_id"},
                    "received_at": record.received_at,
                },
                separators=(",", ":"),
            ).encode()
            + b"\n"
        )
        await asyncio.to_thread(self._write, line)

    def _write(self, line: bytes) -> None:
        with self._lock:
            if self._file is None:
                self._file = self._open_segment()
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())

    def _open_segment(self) -> IO[bytes]:
        path = self.directory / f"spool-{time.time_ns():020d}-{os.getpid()}{SUFFIX}"
        file = open(path, "ab")  # held open until sealed
        fcntl.flock(file.fileno(), fcntl.LOCK_EX)  # "being written": drainers leave it alone
        _fsync_dir(self.directory)  # the new name itself must survive a crash
        return file

    def seal(self) -> None:
        """Finish the current segment; the next append opens a new one."""
        with self._lock:
            if self._file is not None:
                self._file.close()  # releases the lock
                self._file = None

    def segments(self) -> list[Path]:
        return sorted(self.directory.glob(f"spool-*{SUFFIX}"))

    def pending(self) -> bool:
        return bool(self.segments())

    async def drain(self, queue: JobQueue, redis: Any) -> int:
        """Queue every spooled event, oldest first; returns how many new jobs were queued.

        Raises RedisError/OSError when Redis drops again: what is not yet queued stays on disk.
        """
        self.seal()
        queued, seen = 0, set()
        for path in self.segments():
            with _claimed(path) as file:
                if file is None:
                    continue  # another process is writing or draining it
                for entry in _entries(file, path):
                    if entry["job_id"] not in seen:
                        seen.add(entry["job_id"])
                        queued += await _queue_once(queue, redis, entry)
                path.unlink()
                _fsync_dir(self.directory)
        return queued

    async def run_drainer(self, queue: JobQueue, redis: Any, every: float = DRAIN_EVERY) -> None:
        """Drain whenever there is something spooled and Redis answers; runs until cancelled."""
        while True:
            await asyncio.sleep(every)
            if not self.pending():
                continue
            try:
                await redis.ping()
                queued = await self.drain(queue, redis)
            except (RedisError, OSError) as exc:
                log.debug("spool not drained yet: %s", type(exc).__name__)
                continue
            log.info("Redis is back: %d spooled events queued from %s", queued, self.directory)

    def close(self) -> None:
        self.seal()


async def _queue_once(queue: JobQueue, redis: Any, entry: dict[str, Any]) -> int:
    record = JobRecord.model_validate(
        {"id": entry["job_id"], **{k: entry[k] for k in FIELDS[1:] if k in entry}}
    )
    if await queue.submit(record):
        return 1
    # The record exists: queued before, or created just before Redis went away and never enqueued.
    stored = await queue.store.get(record.id)
    if (
        stored is not None
        and stored.state == JobState.QUEUED
        and not await redis.exists(job_key_prefix + record.id, in_progress_key_prefix + record.id)
    ):
        await queue.requeue(stored)
        return 1
    return 0


def _entries(file: IO[bytes], path: Path) -> Iterator[dict[str, Any]]:
    for number, raw in enumerate(file, 1):
        try:
            entry = json.loads(raw)
            if isinstance(entry, dict) and isinstance(entry.get("job_id"), str):
                yield entry
                continue
        except ValueError:
            pass
        # A torn last line from a crash mid-write: the event was never answered 200, so nothing is lost.
        log.warning("skipped unreadable line %d of %s", number, path.name)


class _claimed:
    """Open a finished segment with an exclusive lock, or yield None when someone else holds it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: IO[bytes] | None = None

    def __enter__(self) -> IO[bytes] | None:
        try:
            self.file = open(self.path, "rb")
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            return None
        if not self.path.exists():  # drained and removed between our open and our lock
            self.file.close()
            return None
        return self.file

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


spool_key = web.AppKey("spool", Spool)


async def spool_context(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx entry (after the Redis one): the spool and its drainer for the web process."""
    spool = Spool(spool_dir(app[settings_key]))
    app[spool_key] = spool
    drainer = asyncio.create_task(spool.run_drainer(app[queue_key], app[redis_key]))
    yield
    drainer.cancel()
    try:
        await drainer
    except asyncio.CancelledError:
        pass
    spool.close()
