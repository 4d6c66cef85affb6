"""The intake spool: events accepted while Redis is unreachable, kept on disk until they are queued.

A portal never re-sends an event, so when Redis cannot take a job the web process appends it to a
local file (one JSON line per event, fsync'd before the answer) and a background task moves the
lines into the queue, oldest first, once Redis answers again. Files are segments named by the time
they were opened; the one a process writes to is locked, so a drainer (in this process or another
started later) only ever reads finished segments. A line holds the job's fields and its id, never
the portal's token; queueing by job id makes a line drained twice, or spooled twice, queue once.

A line that cannot become a job (torn by a crash mid-write, or edited by hand) never stops the
drain: it goes to `quarantine.jsonl` beside the segments, with one ERROR line, and is counted on
/readyz and in /metrics. An append that fails part-way is cut back to the last whole line, so the
next event is not glued to a torn one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

from aiohttp import web
from arq.constants import in_progress_key_prefix, job_key_prefix
from redis.exceptions import RedisError

from app.api.keys import queue_key, redis_key, settings_key
from app.api.metrics import field, stage_counts
from app.settings import Settings
from app.store.jobs import JobRecord, JobState
from app.store.queue import JobQueue

log = logging.getLogger(__name__)

SUFFIX = ".jsonl"
QUARANTINE = "quarantine.jsonl"  # lines that cannot become jobs, kept for a person to look at
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
        self._whole = 0  # bytes of whole lines in the current segment
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
                self._file, self._whole = self._open_segment(), 0
            if os.fstat(self._file.fileno()).st_size != self._whole:  # an earlier write failed part-way
                self._cut_torn_tail(self._file)
            if self._file.write(line) != len(line):
                raise OSError(errno.ENOSPC, "the disk took part of the line")
            os.fsync(self._file.fileno())
            self._whole += len(line)

    def _cut_torn_tail(self, file: IO[bytes]) -> None:
        """Back to the last whole line: the next line would be glued to a torn one, and lost with it."""
        self._whole = Path(file.name).read_bytes().rfind(b"\n") + 1
        os.ftruncate(file.fileno(), self._whole)
        log.warning("cut a torn line (a write that failed part-way) off the end of %s", Path(file.name).name)

    def _open_segment(self) -> IO[bytes]:
        path = self.directory / f"spool-{time.time_ns():020d}-{os.getpid()}{SUFFIX}"
        # Unbuffered: a failed write leaves nothing in a buffer to be written after the cut.
        file = open(path, "ab", buffering=0)  # held open until sealed
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

    @property
    def quarantine(self) -> Path:
        return self.directory / QUARANTINE

    def status(self) -> dict[str, int | str]:
        """For /readyz: segments waiting to be drained, and lines quarantined so far."""
        try:
            with self.quarantine.open("rb") as file:
                quarantined = sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 16), b""))
        except FileNotFoundError:
            quarantined = 0
        except OSError as exc:
            return {"error": f"cannot read the spool directory {self.directory}: {exc.strerror}"}
        return {"waiting_segments": len(self.segments()), "quarantined": quarantined}

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
                bad: list[tuple[int, bytes, str]] = []
                for number, raw in enumerate(file, 1):
                    try:
                        record = _record_of(raw)
                    except ValueError as exc:
                        bad.append((number, raw, str(exc).splitlines()[0][:200]))
                        continue
                    if record.id not in seen:
                        seen.add(record.id)
                        queued += await _queue_once(queue, redis, record)
                # Only once the whole segment is queued: a drain cut short by Redis quarantines nothing twice.
                if bad:
                    await self._quarantine(path, bad, redis)
                path.unlink()
                _fsync_dir(self.directory)
        return queued

    async def _quarantine(self, path: Path, bad: list[tuple[int, bytes, str]], redis: Any) -> None:
        with self.quarantine.open("ab") as file:
            for _, raw, _ in bad:
                file.write(raw if raw.endswith(b"\n") else raw + b"\n")
            file.flush()
            os.fsync(file.fileno())
        number, _, why = bad[0]
        log.error("%d spooled lines of %s cannot become jobs (line %d: %s); moved to %s for a person to look "
                  "at, draining goes on", len(bad), path.name, number, why, self.quarantine)
        with contextlib.suppress(RedisError, OSError):  # the lines are safe on disk; the count is only a count
            async with redis.pipeline(transaction=False) as pipe:
                stage_counts(pipe, {field("spool_quarantined"): len(bad)})
                await pipe.execute()

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
            except Exception:  # a bug: said loudly, and the next round tries again rather than stall for good
                log.exception("could not drain the spool in %s; trying again in %g s", self.directory, every)
                continue
            log.info("Redis is back: %d spooled events queued from %s", queued, self.directory)

    def close(self) -> None:
        self.seal()


def _record_of(raw: bytes) -> JobRecord:
    """The job a spooled line holds; ValueError (pydantic's included) for one that holds none."""
    entry = json.loads(raw)
    if not isinstance(entry, dict) or not isinstance(entry.get("job_id"), str):
        raise ValueError("not a spooled event (no job_id)")
    return JobRecord.model_validate({"id": entry["job_id"], **{k: entry[k] for k in FIELDS[1:] if k in entry}})


async def _queue_once(queue: JobQueue, redis: Any, record: JobRecord) -> int:
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
