"""The audit log of every binding change the service made, and undoing a job's changes.

Each change is kept twice in Redis: under its activity (or comment), newest first, to answer "who
moved this and why", and under its job, to undo that job. Both expire with the job records.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from pydantic import BaseModel
from redis.asyncio import Redis

from app.bitrix.client import RestClient
from app.bitrix.connect import portal_client
from app.bitrix.errors import B24Error, ConfigError, TransientError
from app.rebind.executor import TargetsGone, current_bindings, execute
from app.rules.facts import Binding, bindings_text
from app.rules.model import RuleSet
from app.rules.plan import ActivityPlan, BindingPlan, CommentPlan
from app.store.jobs import JobRecord, JobState, JobStore, UnknownJob
from app.store.namespace import prefixed
from app.store.replies import awaited

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


class UndoRefused(Exception):
    """Undo would overwrite something, or has nothing to restore: nothing was changed."""


@dataclass
class UndoResult:
    restored: list[AuditEntry] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def undo_job(job_id: str, log: AuditLog, client: RestClient, finished_at: float | None = None) -> UndoResult:
    """Restore the bindings a job changed, all or nothing: if any item changed since, raise UndoRefused.
    A job retried after an undo (it `finished_at` later) may be undone again: what it changed since.

    The undo is a plan like any other, made from the audit log (each item back from the job's `after`
    to its `before`) and carried out by the executor: binds first, unbinds last, so an item never loses
    its last binding on the way back either, and a record to restore that no longer exists stops it
    before any write."""
    when = await log.undone_at(job_id)
    if when is not None and (finished_at is None or finished_at <= when):
        raise UndoRefused(f"job {job_id} was undone already, at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))}")
    entries = [e for e in await log.for_job(job_id) if e.undo_of is None and e.time > (when or 0)]
    if not entries:
        raise UndoRefused(f"job {job_id} changed no bindings that the audit log still holds")
    try:
        current = await current_bindings(client, [(e.kind, e.item) for e in entries])
    except B24Error as exc:
        if isinstance(exc, (TransientError, ConfigError)):
            raise
        raise UndoRefused(f"could not read the bindings job {job_id} changed: {exc.code} {exc.description}; "
                          "nothing was changed") from None
    moved = [f"{e.kind} {e.item}: the job left [{bindings_text(e.after)}], now it is [{bindings_text(now)}]"
             for e, now in zip(entries, current) if set(now) != set(e.after)]
    if moved:
        raise UndoRefused(f"not undoing job {job_id}: bindings changed since it ran, and undo would overwrite "
                          "that:\n  " + "\n  ".join(moved))
    try:
        outcomes = await execute(undo_plan(job_id, entries), client)
    except TargetsGone as exc:
        raise UndoRefused(f"not undoing job {job_id}: {exc}, and a binding to it would point at nothing; "
                          "nothing was changed") from None
    failed = {(o.kind, o.id) for o in outcomes if o.status != "changed"}
    result = UndoResult(errors=[f"{o.kind} {o.id}: {e['code']} {e['description']}" for o in outcomes for e in o.errors])
    undo_id = f"undo{job_id}"
    result.restored = [e.model_copy(update={"before": e.after, "after": e.before, "job": undo_id, "undo_of": job_id,
                                            "time": time.time(), "rules": []})
                       for e in entries if (e.kind, e.item) not in failed]
    await log.add(undo_id, result.restored)
    if not result.errors:
        await log.mark_undone(job_id)
    return result


def undo_plan(job_id: str, entries: Sequence[AuditEntry]) -> BindingPlan:
    """Each item back from the bindings the job left to those it found."""
    note = (f"undo of job {job_id}",)
    return BindingPlan(
        activities=tuple(ActivityPlan(activity_id=e.item, before=tuple(e.after), after=tuple(e.before), notes=note)
                         for e in entries if e.kind == "activity"),
        comments=tuple(CommentPlan(comment_id=e.item, before=tuple(e.after), after=tuple(e.before), notes=note)
                       for e in entries if e.kind == "comment"))


async def undo_with_rules(job_id: str, log: AuditLog, rules: RuleSet, redis: Redis, store: JobStore,
                          retention_days: float) -> UndoResult:
    """Undo a job against the portal it changed, as the rules file names that portal now; the job's
    record then says `undone`. An unknown job raises UnknownJob."""
    record = await store.get(job_id)
    if record is None:
        raise UnknownJob(job_id, retention_days)
    entries = await log.for_job(job_id)
    if not entries:
        raise UndoRefused(f"job {job_id} changed no bindings ({record.state.value}: {record.outcome}); "
                          "there is nothing to undo")
    portal = rules.portals.get(entries[0].portal)
    if portal is None:
        raise UndoRefused(f"portal {entries[0].portal!r} is not in the rules file; add it back to undo")
    async with aiohttp.ClientSession() as http:  # undo is rare: a session of its own is fine
        result = await undo_job(job_id, log, portal_client(http, portal, redis),
                                None if record.state == JobState.UNDONE else record.finished_at)
    if not result.errors:
        record.mark_undone(len(result.restored))
        await store.save(record)
    return result
