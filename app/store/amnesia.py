"""Noticing a Redis that forgot: a marker this installation keeps in it, and what survives outside it.

Redis can come back empty: a restart without persistence, a failover to a replica that had not synced,
a lost volume, a `FLUSHALL`. Jobs in flight vanish with it, and a portal never sends their events again.
Each long-running process (the web process and a worker process) therefore keeps a look at two things:

- **the marker**, a key (`b24:memory`) holding a random id, written by whichever process first finds
  none. Every process remembers the id it saw (in memory and in `<B24_DATA_DIR>/redis-memory.json`,
  so a process started again still knows). The marker gone, or another id in its place (another
  process found it gone first), means Redis lost this installation's data;
- **the run id** (`INFO server`), which changes with each start of redis-server: a new one with the
  marker still there is a restart or a failover that kept the data (one INFO line), unless Redis's
  append-only file is off: then it came back from its last snapshot at best, and what was written
  after that snapshot is gone, which counts as forgetting too.

A process that notices says so once, as an ERROR naming what may be lost, and queues the reconcile
sweep after forgetting (`workers/reconcile.py`): one arq job per forgetting, whoever notices it first,
over the leads changed since the last sweep the worker knows of. That mark, too, is kept outside Redis
(`SweepMarks`, in the data directory), because the sweep's own cursor was in Redis.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from app.store.namespace import prefixed
from app.store.queue import LIVE_QUEUE

log = logging.getLogger(__name__)

MARKER_KEY = "b24:memory"
MEMORY_FILE = "redis-memory.json"  # in the data directory: the marker and run id this process last saw
MARKS_DIR = "reconcile-marks"  # in the data directory: one file per portal, the last sweep's window
CHECK_EVERY = 2.0  # seconds between looks: a GET and an INFO, far cheaper than the web process's ping
# The worker function that sweeps after Redis forgot (registered in workers/main.py).
AFTER_FORGETTING = "reconcile_after_forgetting"
# How long arq keeps the sweep's result: the job id names the forgetting, so whoever notices it later
# within this time finds it queued or done, and queues nothing more.
AFTER_FORGETTING_KEPT = 86_400
WHAT_MAY_BE_LOST = ("jobs queued, running or waiting to retry (a portal never sends their events again), "
                    "their records and the audit of their changes (undo of them is gone), the reconcile "
                    "cursors, the portals' OAuth tokens (reinstall an application portal whose jobs then "
                    "fail for want of them) and the request budget's state")


@dataclass(frozen=True)
class Forgetting:
    """Redis lost this installation's data, or part of it: why we think so, and which forgetting this is
    (the marker it holds now and its run id: the same for every process that notices it)."""

    why: str
    marker: str
    # A replica promoted with the data there (a failover), not a Redis that lost it: said as a WARNING,
    # since only the writes the old primary had not yet copied can be missing.
    failover: bool = False


class RedisMemory:
    """What one process knows of Redis's memory; `check` compares it with what Redis holds now."""

    def __init__(self, who: str, data_dir: Path, logger: logging.Logger = log) -> None:
        self.who = who
        self.path = data_dir / MEMORY_FILE
        self._log = logger
        self._unsaved_said = False
        known = _read_json(self.path)
        self.marker: str | None = _text_or_none(known.get("marker"))
        self.run_id: str | None = _text_or_none(known.get("run_id"))
        self._from_file = self.marker is not None  # a first look that differs: forgotten since we last ran

    async def check(self, redis: Any) -> Forgetting | None:
        """One look; the Forgetting when Redis lost its data since the last. Raises RedisError (and
        OSError) when Redis cannot be asked: nothing is concluded from an error."""
        key = prefixed(MARKER_KEY)
        async with redis.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.info("server")
            pipe.info("persistence")
            pipe.info("replication")
            raw, server, persistence, replication = await pipe.execute()
        run_id = str(server.get("run_id", "")) or None
        restarted = self.run_id is not None and run_id != self.run_id
        gone = raw is None
        if gone:
            created = uuid.uuid4().hex
            raw = created if await redis.set(key, created, nx=True) else await redis.get(key)
            if raw is None:
                return None  # flushed again between our two commands: the next look decides
        marker = raw.decode() if isinstance(raw, bytes) else str(raw)
        # Without its append-only file a restarted Redis holds at most its last snapshot: the marker
        # (written long before) is back, the jobs written since that snapshot are not.
        aof_off = not int(persistence.get("aof_enabled", 0) or 0)
        forgot = (self.marker is not None and marker != self.marker) or (restarted and aof_off)
        # A promoted replica keeps its old primary's replication id as the second one; a restart has none.
        promoted = restarted and marker == self.marker and str(replication.get("master_replid2", "0")).strip("0") != ""
        why = self._why(restarted, aof_off, gone, marker == self.marker)
        if promoted:
            forgot, why = True, ("it failed over to a replica (a new run id; the replica holds this installation's "
                                 "data): what the old primary had not yet copied to it is gone (nothing acknowledged, "
                                 "with B24_REDIS_MIN_REPLICAS)")
        before, self._from_file = self._from_file, False
        if (marker, run_id) != (self.marker, self.run_id):
            self.marker, self.run_id = marker, run_id
            self._save()
        if forgot:
            return Forgetting(f"{why} since this process last ran" if before else why, f"{marker}:{run_id}", promoted)
        if restarted:
            self._log.info("%s: Redis restarted (its run id changed) and kept this installation's data", self.who)
        return None

    @staticmethod
    def _why(restarted: bool, aof_off: bool, gone: bool, same_marker: bool) -> str:
        if same_marker:
            return ("it restarted, with a new run id, and its append-only file is off (appendonly no): what was "
                    "written after its last snapshot is gone")
        if not gone:
            cause = "its marker changed: another process found Redis empty first"
        elif restarted:
            cause = "it restarted, with a new run id, without this installation's data"
        else:
            cause = "its data was flushed (FLUSHALL, FLUSHDB) or evicted (a maxmemory-policy other than noeviction)"
        if restarted and aof_off:
            cause += "; its append-only file is off (appendonly no), so a restart keeps at most the last snapshot"
        return cause

    async def watch(self, redis: Any, every: float = CHECK_EVERY) -> None:
        """Look every `every` seconds until cancelled; on forgetting, say so once and queue the sweep."""
        unqueued: Forgetting | None = None  # said, but its sweep not yet queued (Redis dropped meanwhile)
        while True:
            try:
                forgetting = await self.check(redis)
                if forgetting is not None:
                    unqueued = forgetting
                    self._log.log(
                        logging.WARNING if forgetting.failover else logging.ERROR,
                        "%s: Redis forgot this installation's data, or part of it: %s. What may be lost: %s. Repair: a "
                        "reconcile sweep of the leads changed since the last sweep is queued (marker %s); events "
                        "from now on are safe. See docs/operations.md, \"What happens when Redis forgets\"",
                        self.who, forgetting.why, WHAT_MAY_BE_LOST, forgetting.marker[:8])
                if unqueued is not None:
                    await queue_sweep_after_forgetting(redis, unqueued, self.who)
                    unqueued = None
            except (RedisError, OSError):
                pass  # Redis is away or loading: the outage watch says so; the next look decides
            await asyncio.sleep(every)

    def _save(self) -> None:
        """Kept across this process's restarts; a data directory it cannot write is said once, not fatal."""
        try:
            _write_json(self.path, {"marker": self.marker, "run_id": self.run_id, "seen_at": round(time.time(), 3)})
        except OSError as exc:
            if not self._unsaved_said:
                self._unsaved_said = True
                self._log.warning("%s: cannot keep what Redis held in %s (%s); a Redis that forgets while this "
                                  "process is stopped will go unnoticed by it", self.who, self.path, exc.strerror)


async def queue_sweep_after_forgetting(redis: Any, forgetting: Forgetting, who: str) -> bool:
    """One sweep per forgetting, whichever process queues it first (arq queues a job id once)."""
    job = await redis.enqueue_job(AFTER_FORGETTING, who, _job_id=prefixed(f"{AFTER_FORGETTING}:{forgetting.marker}"),
                                  _queue_name=prefixed(LIVE_QUEUE))
    return job is not None


@contextlib.asynccontextmanager
async def watching_redis_memory(redis: Any, who: str, data_dir: Path) -> AsyncIterator[RedisMemory]:
    """The watch as a task for as long as the block runs."""
    memory = RedisMemory(who, data_dir)
    task = asyncio.create_task(memory.watch(redis))
    try:
        yield memory
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class SweepMarks:
    """The reconcile sweep's window per portal, kept in the data directory: Redis may forget its cursor."""

    def __init__(self, data_dir: Path) -> None:
        self.directory = data_dir / MARKS_DIR

    def last(self, portal: str) -> dict[str, str]:
        """The last sweep this machine knows of: `since` (where it started) and `cursor` (where it ended)."""
        known = _read_json(self._path(portal))
        return {k: str(v) for k, v in known.items() if k in ("since", "cursor") and isinstance(v, str) and v}

    def save(self, portal: str, since: str, cursor: str) -> None:
        try:
            _write_json(self._path(portal), {"since": since, "cursor": cursor, "at": round(time.time(), 3)})
        except OSError as exc:
            log.warning("cannot keep the reconcile sweep's mark for %s in %s (%s); after Redis forgets, the "
                        "sweep looks back a day instead", portal, self.directory, exc.strerror)

    def _path(self, portal: str) -> Path:
        return self.directory / (re.sub(r"[^A-Za-z0-9_.-]", "_", prefixed(portal))[:100] + ".json")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # none yet, or torn: as if this process had never seen Redis
    return known if isinstance(known, dict) else {}


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """Whole or not at all: several processes may share the data directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(value), encoding="utf-8")
    os.replace(temporary, path)


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
