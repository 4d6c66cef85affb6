"""Undo: a job's changes taken back, as a plan made from the audit log and carried out by the executor."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
from redis.asyncio import Redis

from app.bitrix.client import RestClient
from app.bitrix.connect import portal_client
from app.bitrix.errors import B24Error, ConfigError, TransientError
from app.rebind.binding_steps import current_bindings
from app.rebind.executor import TargetsGone, execute
from app.rules.facts import bindings_text
from app.rules.model import RuleSet
from app.rules.plan import ActivityPlan, BindingPlan, CommentPlan
from app.store.audit import AuditEntry, AuditLog
from app.store.jobs import JobState, JobStore, UnknownJob


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
    await _refuse_if_changed_since(job_id, entries, client)
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


async def _refuse_if_changed_since(job_id: str, entries: Sequence[AuditEntry], client: RestClient) -> None:
    """Undo would overwrite what changed the items since the job: refuse, having written nothing."""
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
