"""The job a worker runs for each event: read facts, plan, apply, and record every step."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from arq import Retry
from redis.exceptions import RedisError

from app.bitrix.client import RestClient
from app.bitrix.connect import portal_batcher as connect_batcher
from app.bitrix.errors import B24Error
from app.portal_config import PortalConfig
from app.bitrix.batcher import PortalBatcher
from app.logs import current_job
from app.rebind.crm_mode import note_mode, noted_modes, read_mode, simple_mode_warning
from app.rebind.echo import MAX_CHANGES_PER_WINDOW, ChangeLog
from app.rebind.executor import TargetsGone, execute
from app.rebind.reading import FactReader, Gone
from app.rebind.locks import LeadLock
from app.rules.engine import plan as make_plan
from app.rules.facts import Facts, read_bindings
from app.rules.model import RuleSet
from app.rules.plan import BindingPlan
from app.store.audit import AuditLog
from app.store.jobs import JobRecord, JobState, JobStore
from app.store.outage import describe
from workers.attempt_counts import stage_attempt
from workers.context import WorkerContext, context_of
from workers.outcomes import AFTER_REDIS_FAILED, Attempt, Then, ending_of, from_plan, nothing_to_do

log = logging.getLogger(__name__)
T = TypeVar("T")

# Runs of a job that started but did not end (its worker killed or stopped each time): past this it is dead.
MAX_RUNS = 200


async def process_event(ctx: dict[str, Any], job: dict[str, Any]) -> str:
    """A job takes its portal's turn first: past its portal's share of this process's slots it goes back
    to arq's queue for later, before reading anything, so a portal's backlog never holds every slot.
    arq counts that run as a try; the job's own record counts only the attempts that ran."""
    context = context_of(ctx)
    portal, low = str(job.get("portal", "")), job.get("trigger") == "backfill"
    turns = context.traffic.turns
    wait = turns.take(portal, low, context.settings.portal_jobs, context.settings.worker_jobs)
    if wait:
        turns.note_waiting(job["job_id"], portal, low, True, turn=True)
        raise Retry(defer=wait)
    try:
        state = await _attempt(context, job)
    except Retry:
        turns.note_waiting(job["job_id"], portal, low, True)
        raise
    finally:
        turns.give_back(portal, low)
    turns.note_waiting(job["job_id"], portal, low, False)
    return state


async def _attempt(context: WorkerContext, job: dict[str, Any]) -> str:
    """read facts → plan → apply → record: how the attempt ended comes from one table (workers/outcomes.py)."""
    rules = context.rules.current  # read once: a reload mid-job does not mix two versions
    current_job.set(job["job_id"])
    record = await _or_later(context.store.get(job["job_id"])) or JobRecord.model_validate({**job, "id": job["job_id"]})
    portal = await _begin(context.store, record, rules)
    if portal is None:
        return record.state.value
    run = _Job.start(context, record, rules, portal)
    earlier_changes = record.changes
    deadline = asyncio.timeout(context.job_timeout)
    try:
        async with deadline:  # the job's own limit: a cancelled job is one whose worker is stopping
            await _run(run, restrict(rules, record))
    except BaseException as exc:
        if await _end_with(run, exc, timed_out=deadline.expired()):
            raise
    finally:
        await _finish(run, applied=record.changes is not earlier_changes)
    return record.state.value


@dataclass
class _Job:
    """One attempt of a job, and what it holds while it runs."""
    context: WorkerContext
    record: JobRecord
    rules: RuleSet
    portal: PortalConfig
    client: RestClient
    changes: ChangeLog
    lock: LeadLock
    superseded: bool = False  # another run took the job over while this one was paused: its record is not ours

    @classmethod
    def start(cls, context: WorkerContext, record: JobRecord, rules: RuleSet, portal: PortalConfig) -> _Job:
        client = portal_client(context, portal, low_priority=record.trigger == "backfill")
        lock = LeadLock(context.redis, portal.name, ttl=context.job_timeout)
        client.meter.guard = lock.still_held  # no write call leaves for this job once its lock has lapsed
        return cls(context, record, rules, portal, client, ChangeLog(context.redis, portal.name), lock)


async def _begin(store: JobStore, record: JobRecord, rules: RuleSet) -> PortalConfig | None:
    """The attempt counted and shown running; None when the job ends before it starts (too many runs, or
    a portal no longer in the rules file), its record saved."""
    record.begin_attempt()  # counted on the record: arq's count includes the turns the job waited for
    portal = rules.portals.get(record.portal)
    if sum(a.outcome != "deferred" for a in record.attempts) > MAX_RUNS:
        record.give_up(f"gave up after {MAX_RUNS} runs", {
            "code": "TOO_MANY_TRIES", "description": f"the job was started {MAX_RUNS} times without ending",
            "what_to_do": "its attempts say why it kept running again; retry it once that is fixed"})
        portal = None
    elif portal is None:
        record.end_attempt(JobState.FAILED, "portal not configured",
                           {"code": "UNKNOWN_PORTAL", "description": f"portal {record.portal!r} is not in the "
                            "rules file", "what_to_do": "add the portal back to the rules file and retry the job"})
    await _or_later(store.save(record))  # shown running, or ended
    return portal


async def _end_with(run: _Job, exc: BaseException, timed_out: bool) -> bool:
    """Record how an attempt that raised ends (`ENDINGS`), and tell arq: raises arq's Retry to run the job
    again later; True when the exception itself must go on (the worker is stopping, or it is no job's)."""
    record, context = run.record, run.context
    ending = ending_of(exc, Attempt(context.job_timeout, timed_out))
    if ending is None:
        return True
    if ending.crashed:
        log.exception("job %s crashed", record.id)
    if ending.superseded_check:
        run.superseded = await _run_elsewhere(context.store, record)
    text = ending.text
    if ending.ask_crm_mode:
        assert isinstance(exc, Gone)
        text += await _why_gone(context, run.rules, run.portal, run.client, exc)
    if ending.then is Then.BACK_OFF:
        _retry_or_give_up(record, context.retry_delays, text, ending.error)
        return False
    record.end_attempt(ending.state, text, ending.error, ending.attempt_outcome)
    if ending.then is Then.WAIT:
        raise Retry(defer=ending.wait) from None
    return ending.then is Then.STOP


async def _finish(run: _Job, applied: bool) -> None:
    """The attempt's record, audit, echo fingerprints and metrics saved, then the lead let go of."""
    record, client = run.record, run.client
    client.close()
    record.requests += client.requests
    try:
        if run.superseded:
            log.warning("job %s: this run lost its lead's lock while paused and another run has the job "
                        "now: it stops here, its writes unsent, its record left to the other run", record.id)
        else:
            await _or_later(_save_attempt(run.context, record, client, run.changes, applied=applied))
    finally:
        await run.lock.release()  # after the record: a job waiting for the lead finds this one's saved
    _log_end(record, client.requests)


async def _or_later(step: Awaitable[T]) -> T:
    """A job whose record Redis fails to read or save goes back in the queue, rather than being dropped
    as arq drops a job that raised: its next run finds done what this one did."""
    try:
        return await step
    except RedisError as exc:
        log.info("job %s: Redis failed to read or save its record (%s); it will run again", current_job.get(),
                 describe(exc))
        raise Retry(defer=AFTER_REDIS_FAILED) from None


async def _run_elsewhere(store: JobStore, record: JobRecord) -> bool:
    """Whether another run of the job has started since this one (its record shows a later attempt)."""
    try:
        current = await store.get(record.id)
    except RedisError:
        return False
    mine = record.attempts[-1].started_at if record.attempts else 0.0
    return current is not None and bool(current.attempts) and current.attempts[-1].started_at > mine


async def _save_attempt(context: WorkerContext, record: JobRecord, client: RestClient, changes: ChangeLog,
                        applied: bool) -> None:
    """The record, and if the attempt applied a plan its audit entries and echo fingerprints, and the
    attempt's metrics: all in one round trip."""
    async with context.redis.pipeline(transaction=False) as pipe:
        await context.store.stage_save(pipe, record)
        if applied:
            AuditLog(context.redis, context.settings.job_retention_days * 86400).stage_job(pipe, record)
            for change in record.changes:
                if "activity" in change and change["status"] == "changed":
                    changes.stage_record(pipe, change["activity"], read_bindings(change["after"]))
        stage_attempt(pipe, record, client, context.limiter)
        await pipe.execute()


def portal_client(context: WorkerContext, portal: PortalConfig, low_priority: bool = False) -> RestClient:
    """A job's RestClient on the portal's one session in this process (its HTTP session, rate limit,
    time budgets, tokens and shared batches); the job closes it when it ends."""
    return RestClient.joining(portal_batcher(context, portal), low_priority=low_priority)


def portal_batcher(context: WorkerContext, portal: PortalConfig) -> PortalBatcher:
    session = context.traffic.batchers.get(portal.name)
    if session is None or (session.portal is not portal and session.portal != portal):
        if session is not None:  # the rules file changed the portal: new jobs get a new session
            context.traffic.retire(session)
        session = context.traffic.batchers[portal.name] = connect_batcher(
            context.http, portal, context.redis, limiter=context.limiter, retry=context.retry_policy,
            budget_reads=context.budget_reads)
    return session


async def _why_gone(context: WorkerContext, rules: RuleSet, portal: PortalConfig, client: RestClient,
                    gone: Gone) -> str:
    """A lead that cannot be read may be a portal in simple CRM mode, where leads never last: ask, once
    a day at most, only when rules about leads exist, and say so."""
    if gone.what != "lead" or not rules.lead_rules():
        return ""
    modes = await noted_modes(context.redis, [portal.name])
    mode = modes.get(portal.name)
    if mode is None:
        try:
            mode = await read_mode(client)
        except B24Error:
            return ""
        await note_mode(context.redis, portal.name, mode)
    warning = simple_mode_warning(rules, portal.name, mode)
    return f"; {warning}" if warning else ""


def _log_end(record: JobRecord, requests: int) -> None:
    """A failed job is a person's business: WARNING, with the portal's code to look up."""
    if record.state in (JobState.FAILED, JobState.DEAD):
        code = (record.error or {}).get("code") or "no code"
        log.warning("job %s %s (%s) after %d requests: %s", record.id, record.state.value, code, requests,
                    record.outcome)
    else:
        log.info("job %s %s after %d requests: %s", record.id, record.state.value, requests, record.outcome)


def _retry_or_give_up(record: JobRecord, delays: tuple[float, ...], why: str,
                      error: dict[str, Any] | None) -> None:
    failures = record.failures  # earlier failed attempts of this job
    if failures >= len(delays):
        record.end_attempt(JobState.DEAD, f"{why} ({failures + 1} attempts)", error)
        return
    record.end_attempt(JobState.RETRYING, f"will retry in {delays[failures]:g} s", error)
    raise Retry(defer=delays[failures])


async def _run(run: _Job, rules: RuleSet) -> None:
    """Read the facts, then plan and apply (`_plan_and_apply`); the record is written by `_finish`."""
    record, client, changes, lock, store = run.record, run.client, run.changes, run.lock, run.context.store
    reader = FactReader(client, rules, is_echo=changes.is_echo, being_written=changes.being_written)
    lead_id = record.lead_id = record.lead_id or await reader.lead_behind(record.event, record.entity_id)
    await lock.acquire(lead_id)  # let go of in the job's last pipeline
    facts = await reader.for_event(record.event, record.entity_id, lead_id)
    lead = facts.leads.get(lead_id) if lead_id else None
    record.lead_version = lead.modified if lead else record.lead_version
    if record.trigger == "backfill" and lead:
        # A reconcile sweep meanwhile asks the portal nothing about a lead whose version this job read.
        await _or_later(store.save(record))
    await _plan_and_apply(record, client, rules, facts, changes)


MAX_REPLANS = 3  # targets deleted while the job runs: plan again without them, this many times


async def _plan_and_apply(record: JobRecord, client: RestClient, rules: RuleSet, facts: Facts,
                          changes: ChangeLog) -> None:
    for replans in range(MAX_REPLANS + 1):
        plan = await _hold_back_loops(make_plan(rules, facts), changes)
        record.rules = list(plan.matched_rules)
        record.plan = plan.summary()
        gone = _gone_note(facts)
        if plan.empty:
            record.end_attempt(JobState.SKIPPED, gone + nothing_to_do(plan, facts.activities))
            return
        try:
            outcomes = await changes.around(plan, execute(plan, client))
            break
        except TargetsGone as exc:
            # Nothing was written: a binding to a deleted record would leave the activity bound to
            # nothing real once the lead binding goes. Plan again without it.
            log.info("job %s: %s; planning again without them", record.id, exc)
            if replans == MAX_REPLANS:
                raise
            facts = facts.model_copy(update={"missing": facts.missing | exc.targets})
    _record_outcomes(record, outcomes, _gone_note(facts))


def _gone_note(facts: Facts) -> str:
    if not facts.missing:
        return ""
    names = ", ".join(sorted(str(b) for b in facts.missing))
    return f"left out of the plan, deleted since they were read: {names}; "


def _record_outcomes(record: JobRecord, outcomes: list[Any], gone: str) -> None:
    record.changes = [o.as_record() for o in outcomes]  # the echo fingerprints are saved from these
    record.end_attempt(*from_plan(outcomes, gone))


def restrict(rules: RuleSet, record: JobRecord) -> RuleSet:
    """A backfill may run one rule only, or only plan."""
    if record.only_rule:
        rules = rules.model_copy(update={"rules": [r for r in rules.rules if r.name == record.only_rule]})
    return rules.model_copy(update={"mode": "dry_run"}) if record.dry_run else rules


async def _hold_back_loops(plan: BindingPlan, changes: ChangeLog) -> BindingPlan:
    """Leave alone the activities this service keeps changing: some rules undo each other."""
    looping = await changes.looping([a.activity_id for a in plan.activities if a.changes and not a.dry_run])
    if not looping:
        return plan
    note = (f"stopped: this service changed it {MAX_CHANGES_PER_WINDOW} times within the hour; "
            "two rules probably undo each other, check the rules file")
    held = tuple(a.model_copy(update={"after": a.before, "moves": (), "notes": (*a.notes, note)})
                 if a.activity_id in looping else a for a in plan.activities)
    return plan.model_copy(update={"activities": held})
