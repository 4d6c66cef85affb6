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
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Any

import orjson
import pydantic
from aiohttp import web
from arq.constants import in_progress_key_prefix, job_key_prefix
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    ExecAbortError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.api.keys import queue_key, redis_key, settings_key
from app.store.counters import field, stage_counts
from app.settings import Settings
from app.store.jobs import JobRecord, JobState, is_job_id
from app.store.outage import describe
from app.store.queue import JobQueue

log = logging.getLogger(__name__)

SUFFIX = ".jsonl"
QUARANTINE = "quarantine.jsonl"  # lines that cannot become jobs, kept for a person to look at
DRAIN_EVERY = 1.0  # seconds between looks at the spool while it holds events
MAX_LINE = 64 * 1024  # a spooled event is about 300 bytes; a longer line was not written by a spool
LARGEST_ID = 2**63 - 1  # Bitrix24's ids are 64-bit signed integers, and so are Redis's
# Redis's answers that refuse every write for now, whatever the value: the drain waits, no line is to blame.
REFUSES_EVERY_WRITE = ("OOM", "READONLY", "MISCONF", "BUSY", "MASTERDOWN", "NOREPLICAS", "LOADING", "NOPERM",
                       "NOAUTH", "WRONGPASS", "CLUSTERDOWN", "TRYAGAIN", "UNBLOCKED", "NOSCRIPT")
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
            for number, raw, unfit in _lines(file):
                try:
                    if unfit:
                        raise UnfitLine(unfit)
                    record = _record_of(raw)
                    if record.id not in seen:
                        queued += await _queue_once(queue, redis, record)
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
                file.write(_quarantine_line(path.name, number, raw, why))
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


class UnfitLine(ValueError):
    """A spooled line that cannot become a job; the message is the reason, starting with its kind."""


class RedisUnreachable(Exception):
    """Redis dropped mid-drain: what is not yet queued stays on disk."""


class RedisRefuses(Exception):
    """Redis answers every write with an error for now (out of memory, read-only): no line is to blame."""


def _lines(file: IO[bytes]) -> Iterator[tuple[int, bytes, str]]:
    """Each line with its number, and why it is unfit when that is known before reading it (too long)."""
    number = 0
    while raw := file.readline(MAX_LINE + 1):
        number += 1
        if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
            while (rest := file.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                pass
            yield number, raw[:1024], f"size: the line is over {MAX_LINE // 1024} KiB (its first KiB is kept)"
            continue
        yield number, raw, ""


def _no_constant(name: str) -> float:
    raise UnfitLine(f"range: {name} is not a number a job can hold")


def _record_of(raw: bytes) -> JobRecord:
    """The job a spooled line holds; UnfitLine, with the reason, for one that holds none."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnfitLine(f"text: the line is not UTF-8 (byte {exc.start})") from None
    try:
        entry = json.loads(text, parse_constant=_no_constant)
    except UnfitLine:
        raise
    except (ValueError, RecursionError) as exc:
        raise UnfitLine(f"JSON: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("job_id"), str):
        raise UnfitLine("types: not a spooled event (no job_id)")
    _check_text(entry)
    if isinstance(entry.get("entity_id"), bool) or isinstance(entry.get("received_at"), bool):
        raise UnfitLine("types: entity_id and received_at are numbers, not true or false")
    if not is_job_id(entry["job_id"]):
        raise UnfitLine("types: job_id is not a job id (letters and digits, at most 64)")
    try:
        record = JobRecord.model_validate({"id": entry["job_id"], **{k: entry[k] for k in FIELDS[1:] if k in entry}})
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "the line"
        raise UnfitLine(f"types: {where}: {error['msg']}") from None
    if not 0 < record.entity_id <= LARGEST_ID:
        raise UnfitLine(f"range: entity_id {str(record.entity_id)[:40]} is not a positive 64-bit id")
    if not (math.isfinite(record.received_at) and record.received_at >= 0):
        raise UnfitLine(f"range: received_at {record.received_at!r} is not a time")
    try:  # what the queue will write: a value no serializer takes is unfit here, not a failure in Redis
        orjson.dumps(record.task_args())
        record.model_dump_json()
    except (TypeError, ValueError) as exc:
        raise UnfitLine(f"types: cannot be stored ({str(exc)[:160]})") from None
    return record


def _check_text(entry: dict[str, Any]) -> None:
    """Text Redis and every reader can take: UTF-8, so no lone surrogate (JSON lets "\\ud800" through).
    A loop, not recursion: a hostile line nests deep."""
    stack: list[tuple[str, object]] = [("", entry)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise UnfitLine(f"text: {where or 'a field'} holds a lone surrogate, which is not text") from None
        elif isinstance(value, dict):
            for key, item in value.items():
                stack += [(where, key), (f"{where}.{key}" if where else str(key), item)]
        elif isinstance(value, list):
            stack += [(where, item) for item in value]


def _refuses_every_write(exc: RedisError) -> bool:
    """An answer about Redis's state, not about the value: redis-py names the usual ones by class (and
    takes the code off the text); others, and those from inside a script, keep their code in the text."""
    if isinstance(exc, (OutOfMemoryError, ReadOnlyError, NoPermissionError, NoScriptError, ExecAbortError)):
        return True
    words = set(str(exc).replace(":", " ").replace("-", " ").split())
    return bool(words & set(REFUSES_EVERY_WRITE))


def _refusal(exc: RedisError) -> str:
    """What Redis said, from its code on (a script's error puts it after the script's name)."""
    text = " ".join(str(exc).split())
    found = [i for code in REFUSES_EVERY_WRITE if (i := text.find(code)) >= 0]
    return text[min(found):][:200] if found else describe(exc)


def _quarantine_line(segment: str, number: int, raw: bytes, why: str) -> bytes:
    """One JSON line: where the line was, why it is here, and the line itself (as text when it is UTF-8)."""
    entry: dict[str, object] = {"segment": segment, "line": number, "reason": why,
                                "quarantined_at": round(time.time(), 3)}
    try:
        entry["text"] = raw.decode("utf-8")
    except UnicodeDecodeError:
        entry["base64"] = base64.b64encode(raw).decode()
    return orjson.dumps(entry) + b"\n"


async def _queue_once(queue: JobQueue, redis: Any, record: JobRecord) -> int:
    """Queue the job unless it is queued already; UnfitLine when Redis refuses this value (not every write)."""
    try:
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
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise RedisUnreachable(describe(exc)) from exc
    except RedisError as exc:
        if _refuses_every_write(exc):
            raise RedisRefuses(_refusal(exc)) from exc
        raise UnfitLine(f"Redis refused it: {describe(exc)}") from None
    except (TypeError, ValueError) as exc:  # the client could not encode it (a value _record_of let through)
        raise UnfitLine(f"types: cannot be sent to Redis ({describe(exc)})") from None


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
