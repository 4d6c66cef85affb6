"""Reconciliation: find converted leads whose events were missed, and queue a job for each.

Push delivery can miss events (the service was down, the handler was misconfigured). A sweep pages
the leads converted since the portal's cursor (`DATE_MODIFY`, kept in Redis per portal), asks in one
`batch` per page which of them still have activities bound to them, and queues a job (trigger
"reconcile") for those only. A job's id comes from the lead and its `DATE_MODIFY`, so overlapping
sweeps queue a lead once per version of it. Before asking the portal, a page's leads already in hand
are left out: those with a job for this version of them, or a backfill job still to run or that read
this version (one Redis read a page, through job ids the sweep can compute). The worker runs a sweep on a schedule (arq cron, every
`B24_RECONCILE_INTERVAL` seconds across all workers); `b24rebind reconcile` runs one by hand.

A portal in application mode set up for offline events (`auth: oauth`, `offline_events: true`, the
events bound with `event_type=offline`) is reconciled from those instead: `event.offline.get` with
`clear=0` reserves a batch under a `process_id`, its jobs are queued (trigger "offline"), and only
then `event.offline.clear` drops it, so a crash in between leaves the batch to be read again.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.bitrix.client import PAGE_SIZE, Command, RestClient, fast_page
from app.bitrix.errors import B24Error
from app.store.backfill_runs import job_id_in_run, runs_under_way
from app.live_rules import LiveRules, load_service_rules
from app.rules.model import EntityType
from app.settings import Settings
from app.store.amnesia import SweepMarks
from app.store.bundled_redis import with_redis
from app.store.jobs import JobRecord, JobState, JobStore
from app.store.namespace import prefixed
from app.store.queue import JobQueue, connect
from workers.context import WorkerContext, context_of
from workers.tasks import portal_client

log = logging.getLogger(__name__)

TRIGGER = "reconcile"
LOOKBACK = timedelta(days=1)  # how far back the first sweep of a portal looks
GATE_KEY = "b24:reconcile:gate"  # set for the interval by whichever worker sweeps first
TICK = 10  # seconds between the cron's looks at the gate
SAME_VERSION = "a job for this version of the lead exists"
BACKFILL_WAITING = "a backfill job for the lead is still to run"
BACKFILL_RAN = "a backfill job read this version of the lead"


def cursor_key(portal: str) -> str:
    return prefixed(f"b24:reconcile:{portal}:cursor")


@dataclass
class Sweep:
    portal: str
    since: str
    leads_seen: int = 0
    queued: list[str] = field(default_factory=list)
    cursor: str = ""
    skipped: Counter[str] = field(default_factory=Counter)  # leads not asked about, by why

    def skipped_text(self) -> str:
        return "; ".join(f"{count} skipped: {why}" for why, count in self.skipped.most_common())


async def sweep(client: RestClient, queue: JobQueue, redis: Redis, since: str | None = None,
                marks: SweepMarks | None = None) -> Sweep:
    """Queue a job for each lead converted since the cursor that still has activities bound to it.

    The cursor is in Redis, and in `marks` (the data directory) too: a Redis that forgot it does not
    send the sweep a day back."""
    portal = client.portal.name
    stored = await redis.get(cursor_key(portal))
    first = (datetime.now().astimezone() - LOOKBACK).isoformat("T", "seconds")
    kept = marks.last(portal).get("cursor") if marks is not None else None
    start = since or (stored.decode() if stored else kept or first)
    result = Sweep(portal, start, cursor=start)
    runs = await runs_under_way(redis, queue.store, portal, _timestamp(start) or time.time() - LOOKBACK.total_seconds())
    last_id = 0
    while True:
        filter = {"STATUS_SEMANTIC_ID": "S", ">=DATE_MODIFY": start}
        page = (
            await client.call("crm.lead.list", fast_page(filter, ["ID", "DATE_MODIFY"], last_id))
        ).result or []
        if page:
            await _sweep_page(client, queue, page, runs, result)
            last_id = int(page[-1]["ID"])
        if len(page) < PAGE_SIZE:
            break
    # Next time from the newest change seen: the portal's clock, so no skew with ours.
    await redis.set(cursor_key(portal), result.cursor)
    if marks is not None:
        marks.save(portal, start, result.cursor)
    log.info(
        "reconcile %s: %d converted leads since %s, %d queued%s",
        portal,
        result.leads_seen,
        start,
        len(result.queued),
        f"; {result.skipped_text()}" if result.skipped else "",
    )
    return result


async def _sweep_page(client: RestClient, queue: JobQueue, page: list[dict[str, Any]], runs: list[str],
                      result: Sweep) -> None:
    """One page of converted leads: skip those in hand, ask the portal about the rest, queue a job for
    each that still has activities bound to it."""
    portal = result.portal
    in_hand = await _in_hand(queue.store, portal, page, runs)
    result.skipped.update(in_hand.values())
    ask = [int(row["ID"]) for row in page if int(row["ID"]) not in in_hand]
    bound = await _with_activities(client, ask) if ask else set()
    for row in page:
        if int(row["ID"]) in bound:
            record = _job_for(portal, int(row["ID"]), str(row.get("DATE_MODIFY", "")))
            if await queue.submit(record):
                result.queued.append(record.id)
        result.cursor = max(result.cursor, str(row.get("DATE_MODIFY") or ""))
    result.leads_seen += len(page)


async def _in_hand(store: JobStore, portal: str, page: list[dict[str, Any]], runs: list[str]) -> dict[int, str]:
    """The page's leads that need no question to the portal, and why: their jobs' ids are known (this
    version's reconcile job; each backfill run's job), so one read of those records tells."""
    leads = [(int(row["ID"]), str(row.get("DATE_MODIFY") or "")) for row in page]
    ids = [[_job_for(portal, lead, modified).id, *(job_id_in_run(portal, run, lead) for run in runs)]
           for lead, modified in leads]
    found = iter(await store.get_many([job_id for per_lead in ids for job_id in per_lead]))
    in_hand = {}
    for (lead, modified), per_lead in zip(leads, ids):
        same_version, *backfill = [next(found) for _ in per_lead]
        why = SAME_VERSION if same_version is not None else next(
            (w for record in backfill if record is not None and (w := _covers(record, modified))), None)
        if why:
            in_hand[lead] = why
    return in_hand


def _covers(record: JobRecord, modified: str) -> str | None:
    """Why a backfill job makes asking about its lead useless: it will read the lead, or it read this
    version of it (its DATE_MODIFY, by the portal's clock: no skew with ours). A dry run or a one-rule
    run does not stand for the rules; a failed or undone job is the sweep's to pick up again."""
    if record.dry_run or record.only_rule:
        return None
    if record.state in (JobState.QUEUED, JobState.RETRYING):
        return BACKFILL_WAITING
    if record.state == JobState.RUNNING and not record.lead_version:
        # Started and not yet through its reads (a backfill job saves the version it read at once):
        # it reads the lead as it is now.
        return BACKFILL_WAITING
    read, version = _timestamp(record.lead_version), _timestamp(modified)
    if record.state in (JobState.RUNNING, JobState.SUCCEEDED, JobState.SKIPPED) and read is not None \
            and version is not None and read >= version:
        return BACKFILL_RAN
    return None


def _timestamp(portal_time: str) -> float | None:
    """A portal's DATE_MODIFY (ISO 8601 with its offset) as Unix seconds; None if it is not one."""
    try:
        moment = datetime.fromisoformat(portal_time)
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.astimezone()).timestamp()


async def _with_activities(client: RestClient, lead_ids: list[int]) -> set[int]:
    """Which of these leads still have an activity bound to them: one batch for a page of leads."""
    commands = [
        Command(
            "crm.activity.list",
            fast_page({"BINDINGS": [{"OWNER_TYPE_ID": int(EntityType.LEAD), "OWNER_ID": lead}]}, ["ID"], 0),
        )
        for lead in lead_ids
    ]
    results = await client.batch(commands)
    # A lead whose check failed is queued anyway: the job reads it properly and skips it if need be.
    return {lead for lead, result in zip(lead_ids, results) if not result.ok or result.result}


async def drain_offline(client: RestClient, queue: JobQueue, events: set[str]) -> Sweep:
    """Queue the portal's offline events that a rule listens to; clear each batch once it is queued."""
    result = Sweep(client.portal.name, "offline events")
    while True:
        answer = (await client.call("event.offline.get", {"clear": 0, "limit": PAGE_SIZE})).result or {}
        batch = answer.get("events") or [] if isinstance(answer, dict) else []
        for event in batch:
            name = str(event.get("EVENT_NAME", "")).upper()
            entity = str(((event.get("EVENT_DATA") or {}).get("FIELDS") or {}).get("ID", ""))
            if name in events and entity.isascii() and entity.isdigit():
                record = JobRecord.for_event(client.portal.name, name, int(entity), f"offline:{event.get('MESSAGE_ID')}")
                if await queue.submit(record.model_copy(update={"trigger": "offline"})):
                    result.queued.append(record.id)
        result.leads_seen += len(batch)
        if answer.get("process_id"):
            await client.call("event.offline.clear", {"process_id": answer["process_id"]}, write=True)
        if len(batch) < PAGE_SIZE:
            return result


def _job_for(portal: str, lead_id: int, modified: str) -> JobRecord:
    record = JobRecord.for_event(portal, "ONCRMLEADUPDATE", lead_id, f"reconcile:{modified}")
    return record.model_copy(update={"trigger": TRIGGER})


async def sweep_all(context: WorkerContext, portals: list[str] | None = None,
                    after_forgetting: bool = False) -> list[Sweep]:
    """Sweep each portal in the rules (or the named ones) with the worker's resources.

    `after_forgetting`: Redis lost its data, cursors included. Each portal's leads are swept from where
    the last sweep this machine knows of began (its jobs may have been lost too), or a day back; a portal
    read through offline events is swept by its leads as well, since the events it handed over are gone."""
    rules = context.rules.current
    queue = JobQueue(context.redis, context.store)
    marks = SweepMarks(context.settings.data_dir)
    done = []
    for name, portal in rules.portals.items():
        if portals is not None and name not in portals:
            continue
        client = portal_client(context, portal, low_priority=True)
        try:
            if after_forgetting:
                done.append(await sweep(client, queue, context.redis, marks.last(name).get("since"), marks))
            elif portal.offline_events:
                done.append(await drain_offline(client, queue, rules.events()))
            else:
                done.append(await sweep(client, queue, context.redis, marks=marks))
        except B24Error as exc:
            log.error("reconcile %s failed: %s", name, exc)
        finally:
            client.close()
    return done


async def reconcile_job(ctx: dict[str, Any]) -> int:
    """The worker's cron entry: sweeps at most once per interval whichever worker gets here first."""
    context = context_of(ctx)
    interval = context.settings.reconcile_interval
    gate = prefixed(GATE_KEY)
    try:
        if not interval or not await context.redis.set(gate, time.time(), nx=True, px=int(interval * 1000)):
            return 0
        return sum(len(s.queued) for s in await sweep_all(context))
    except RedisError as exc:  # the worker says once that Redis is away; the next tick sweeps again
        log.info("reconcile skipped: Redis is unreachable (%s)", type(exc).__name__)
        return 0


async def reconcile_after_forgetting(ctx: dict[str, Any], noticed_by: str = "") -> int:
    """The job a process queues when it finds that Redis forgot (app/store/amnesia.py): one sweep of
    every portal, whatever B24_RECONCILE_INTERVAL says, since no event of the lost jobs comes again."""
    context = context_of(ctx)
    done = await sweep_all(context, after_forgetting=True)
    queued = sum(len(s.queued) for s in done)
    log.warning("reconcile after Redis forgot (noticed by the %s process): %s; %d jobs queued to put right what "
                "the lost jobs would have", noticed_by or "?",
                "; ".join(f"{s.portal}: {s.leads_seen} converted leads since {s.since}" for s in done) or "no portal",
                queued)
    return queued


async def reconcile_command(settings: Settings, portal: str | None) -> int:
    """`b24rebind reconcile`: one sweep now; running workers do the queued jobs."""
    rules = load_service_rules(settings)
    if portal is not None and portal not in rules.portals:
        print(f"b24rebind: no portal {portal!r}; the rules file has: {', '.join(rules.portals) or 'none'}",
              file=sys.stderr)
        return 2
    async with AsyncExitStack() as stack:
        settings = with_redis(settings, stack)
        redis = await connect(settings)
        stack.push_async_callback(redis.aclose)
        context = WorkerContext.make(settings, LiveRules(rules), redis)
        stack.push_async_callback(context.close)
        for done in await sweep_all(context, None if portal is None else [portal]):
            print(
                f"reconcile {done.portal}: {done.leads_seen} leads converted since {done.since}, "
                f"{len(done.queued)} with activities still on the lead queued (trigger {TRIGGER!r})"
                + (f"; {done.skipped_text()}" if done.skipped else "")
            )
    return 0
