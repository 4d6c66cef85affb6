"""The intake spool: events accepted while Redis is unreachable, kept on disk until they are queued.

A portal never re-sends an event, so when Redis cannot take a job the web process appends it to a
local file (one JSON line per event, fsync'd before the answer) and a background task moves the
lines into the queue, oldest first, once Redis answers again. Files are segments named by the time
they were opened; the one a process writes to is locked, so a drainer (in this process or another
started later) only ever reads finished segments. A line holds the job's fields and its id, never
the portal's token; queueing by job id makes a line drained twice, or spooled twice, queue once.

A line that cannot become a job, whatever the reason (torn by a crash mid-write, edited by hand: not
JSON, a field of the wrong type, a number out of range such as an entity_id over 64 bits or NaN, text
no one can store such as a lone surrogate, or a value Redis answers with an error), never stops the
drain: it goes to `quarantine.jsonl` beside the segments as one JSON line with the reason, with one
ERROR line per segment, and is counted on /readyz and in /metrics; the lines after it, and the
segments after its own, are queued as usual. A Redis that answers with an error meant for every write
(out of memory, a read-only replica) is not an outage either: the drain stops, says so in one WARNING
and tries again. An append that fails part-way is cut back to the last whole line, so the next event
is not glued to a torn one.

Here: the segments, writing them and draining them. What a line holds, and why one is unfit, is
`spool_lines`; queueing a line's job, and telling a refused value from a Redis that refuses every
write, is `spool_queueing`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.api.keys import queue_key, redis_key, settings_key
from app.intake.spool_lines import MAX_LINE, UnfitLine, event_line, quarantine_line, read_lines, record_of
from app.intake.spool_queueing import RedisRefuses, RedisUnreachable, queue_once
from app.settings import Settings
from app.store.counters import field, stage_counts
from app.store.job_record import JobRecord
from app.store.outage import describe
from app.store.queue import JobQueue

# MAX_LINE is named here too: the tests size their lines by it.
__all__ = ["DRAIN_EVERY", "MAX_LINE", "QUARANTINE", "SUFFIX", "Spool", "spool_context", "spool_dir",
           "spool_key", "spool_status"]

log = logging.getLogger(__name__)

SUFFIX = ".jsonl"
QUARANTINE = "quarantine.jsonl"  # lines that cannot become jobs, kept for a person to look at
DRAIN_EVERY = 1.0  # seconds between looks at the spool while it holds events


def spool_dir(settings: Settings) -> Path:
    return settings.spool_dir or settings.data_dir / "spool"


def spool_status(directory: Path) -> dict[str, int | str]:
    """Segments waiting to be drained and lines quarantined so far in a spool directory (read only)."""
    try:
        with (directory / QUARANTINE).open("rb") as file:
            quarantined = sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 16), b""))
    except FileNotFoundError:
        quarantined = 0
    except OSError as exc:
        return {"error": f"cannot read the spool directory {directory}: {exc.strerror}"}
    return {"waiting_segments": len(list(directory.glob(f"spool-*{SUFFIX}"))), "quarantined": quarantined}


class Spool:
    """Appends events to the current segment (fsync'd) and drains finished segments into a JobQueue."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._file: IO[bytes] | None = None
        self._whole = 0  # bytes of whole lines in the current segment
        self._lock = threading.Lock()  # appends come from worker threads; keep lines whole and ordered
        self._reported: set[str] = set()  # segments that could not be drained, said once each
        self.directory.mkdir(parents=True, exist_ok=True)

    async def append(self, record: JobRecord) -> None:
        """Write the job to disk and fsync it; raises OSError when the disk cannot take it."""
        await asyncio.to_thread(self._write, event_line(record))

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
        return spool_status(self.directory)

    async def drain(self, queue: JobQueue, redis: Any) -> int:
        """Queue every spooled event, oldest first; returns how many new jobs were queued.

        Raises RedisUnreachable when Redis drops again, RedisRefuses when it answers every write with an
        error: what is not yet queued stays on disk. A line that cannot become a job is quarantined; a
        segment that cannot be read at all is said once and left, and the later ones are drained.
        """
        self.seal()
        queued, seen = 0, set[str]()
        for path in self.segments():
            try:
                queued += await self._drain_segment(path, queue, redis, seen)
            except (RedisUnreachable, RedisRefuses):
                raise
            except Exception as exc:  # the disk, or a bug: this segment waits, the later ones go on
                if path.name not in self._reported:
                    self._reported.add(path.name)
                    log.error("could not drain the spool segment %s (%s); it stays where it is and the later "
                              "segments are drained. Check the file's permissions and the disk; the drain "
                              "tries it again each round", path, describe(exc), exc_info=not isinstance(exc, OSError))
        return queued

    async def _drain_segment(self, path: Path, queue: JobQueue, redis: Any, seen: set[str]) -> int:
        queued = 0
        with _claimed(path) as file:
            if file is None:
                return 0  # another process is writing or draining it
            bad: list[tuple[int, bytes, str]] = []
            for number, raw, unfit in read_lines(file):
                try:
                    if unfit:
                        raise UnfitLine(unfit)
                    record = record_of(raw)
                    if record.id not in seen:
                        queued += await queue_once(queue, redis, record)
                        seen.add(record.id)
                except UnfitLine as exc:
                    bad.append((number, raw, str(exc)))
            # Only once the whole segment is queued: a drain cut short by Redis quarantines nothing twice.
            if bad:
                await self._quarantine(path, bad, redis)
            path.unlink()
            _fsync_dir(self.directory)
        self._reported.discard(path.name)
        return queued

    async def _quarantine(self, path: Path, bad: list[tuple[int, bytes, str]], redis: Any) -> None:
        with self.quarantine.open("ab") as file:
            for number, raw, why in bad:
                file.write(quarantine_line(path.name, number, raw, why))
            file.flush()
            os.fsync(file.fileno())
        number, _, why = bad[0]
        log.error("%d spooled lines of %s cannot become jobs (line %d: %s); moved to %s with the reason for a "
                  "person to look at, draining goes on", len(bad), path.name, number, why, self.quarantine)
        with contextlib.suppress(RedisError, OSError):  # the lines are safe on disk; the count is only a count
            async with redis.pipeline(transaction=False) as pipe:
                stage_counts(pipe, {field("spool_quarantined"): len(bad)})
                await pipe.execute()

    async def run_drainer(self, queue: JobQueue, redis: Any, every: float = DRAIN_EVERY) -> None:
        """Drain whenever there is something spooled and Redis answers; runs until cancelled."""
        refused = ""  # what Redis last refused the drain with, said once until it changes or clears
        while True:
            await asyncio.sleep(every)
            if not self.pending():
                continue
            try:
                await redis.ping()
                queued = await self.drain(queue, redis)
            except (RedisUnreachable, RedisConnectionError, RedisTimeoutError, OSError) as exc:
                # An outage: the web process's watch says so once; the spool just waits for it.
                log.debug("spool not drained yet: %s", type(exc).__name__)
                continue
            except (RedisRefuses, RedisError) as exc:
                said = str(exc) if isinstance(exc, RedisRefuses) else describe(exc)
                if said != refused:
                    refused = said
                    log.warning("Redis answers but refuses the spool's writes (%s): %d segments wait in %s; "
                                "the drain tries again every %g s. Fix what Redis says (memory, a read-only "
                                "replica, its disk)", said, len(self.segments()), self.directory, every)
                continue
            if refused:
                refused = ""
                log.info("Redis takes the spool's writes again")
            if queued:
                log.info("%d spooled events queued from %s", queued, self.directory)

    def close(self) -> None:
        self.seal()


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
