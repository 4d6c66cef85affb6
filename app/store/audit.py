"""The audit log of every binding change the service made (undoing a job's changes: `app.rebind.undo`).

Each change is kept twice in Redis: under its activity (or comment), newest first, to answer "who
moved this and why", and under its job, to undo that job. Both expire with the job records.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from redis.asyncio import Redis

from app.crm import Binding
from app.store.jobs import JobRecord
from app.store.namespace import prefixed
from app.store.redis_typing import awaited

ITEM_KEY = "b24:audit:item:"  # + "activity:12" -> list of entries, newest first
JOB_KEY = "b24:audit:job:"  # + job id -> list of entries, in the order applied
UNDONE_KEY = "b24:audit:undone:"  # + job id -> when it was undone
KEEP_PER_ITEM = 200


class AuditEntry(BaseModel):
    """One item's bindings changed by one job."""

    portal: str
    kind: str  # activity | comment
    item: int
    before: list[Binding]  # entries written before bindings were values hold text; Binding reads both
    after: list[Binding]
    rules: list[str]
    job: str
    time: float
    undo_of: str | None = None


class AuditLog:
    """Audit entries in Redis, kept as long as job records."""

    def __init__(self, redis: Redis, retention_seconds: float) -> None:
        self._redis = redis
        self._ttl = int(retention_seconds)

    def stage_job(self, pipe: Any, record: JobRecord) -> list[AuditEntry]:
        """Log each item the job changed (not the dry-run or failed ones), as part of a pipeline: a
        job's last writes reach Redis in one round trip."""
        rules = {(kind, item[kind]): item.get("rules", []) for item in record.plan
                 for kind in ("activity", "comment") if kind in item}
        entries = [AuditEntry(portal=record.portal, kind=kind, item=change[kind], before=change["before"],
                              after=change["after"], rules=rules.get((kind, change[kind])) or record.rules,
                              job=record.id, time=time.time())
                   for change in record.changes if change.get("status") == "changed"
                   for kind in ("activity", "comment") if kind in change]
        self._stage(pipe, record.id, entries)
        return entries

    async def add(self, job_id: str, entries: Sequence[AuditEntry]) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            self._stage(pipe, job_id, entries)
            await pipe.execute()

    def _stage(self, pipe: Any, job_id: str, entries: Sequence[AuditEntry]) -> None:
        if not entries:
            return
        dumped = [entry.model_dump_json() for entry in entries]
        for entry, text in zip(entries, dumped):
            key = prefixed(f"{ITEM_KEY}{entry.kind}:{entry.item}")
            pipe.lpush(key, text)
            pipe.ltrim(key, 0, KEEP_PER_ITEM - 1)
            pipe.expire(key, self._ttl)
        pipe.rpush(prefixed(JOB_KEY + job_id), *dumped)
        pipe.expire(prefixed(JOB_KEY + job_id), self._ttl)

    async def for_item(self, item: int, kind: str = "activity", portal: str | None = None,
                       limit: int = 50) -> list[AuditEntry]:
        """The changes made to one activity or comment, newest first."""
        raws = await awaited(self._redis.lrange(prefixed(f"{ITEM_KEY}{kind}:{item}"), 0, KEEP_PER_ITEM - 1))
        entries = [AuditEntry.model_validate_json(raw) for raw in raws]
        return [e for e in entries if portal is None or e.portal == portal][:limit]

    async def for_job(self, job_id: str) -> list[AuditEntry]:
        raws = await awaited(self._redis.lrange(prefixed(JOB_KEY + job_id), 0, -1))
        return [AuditEntry.model_validate_json(raw) for raw in raws]

    async def undone_at(self, job_id: str) -> float | None:
        value = await self._redis.get(prefixed(UNDONE_KEY + job_id))
        return float(value) if value else None

    async def mark_undone(self, job_id: str) -> None:
        await self._redis.set(prefixed(UNDONE_KEY + job_id), time.time(), ex=self._ttl)
