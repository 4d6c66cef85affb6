"""`b24rebind jobs list|show|retry|watch`, `stats`, `audit` and `undo`: the API's answers in a terminal.

These commands read Redis directly (REDIS_URL, or the bundled Redis of the data directory), so they
work with or without the web process running.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.api import stats
from app.api.endpoints import BadRequest, parse_list_query
from app.cli.backfill import progress_bar
from app.live_rules import load_service_rules
from app.rules.facts import bindings_text
from app.settings import Settings
from app.rebind.undo import UndoRefused, undo_with_rules
from app.store.audit import AuditLog
from app.store.bundled_redis import BundledRedis
from app.store.jobs import FINAL_STATES, JobQuery, JobRecord, JobState, JobStore, UnknownJob, reapply_note
from app.store.outage import describe
from app.store.queue import JobQueue, connect
from app.words import plural

COMMANDS = ("jobs", "stats", "audit", "undo")
FILTERS = ("state", "portal", "rule", "event", "entity", "lead", "trigger", "since", "until")


def add_commands(subparsers: Any) -> None:
    """Register the commands on the `b24rebind` parser."""
    jobs = subparsers.add_parser("jobs", help="list, show, retry and watch jobs")
    actions = jobs.add_subparsers(dest="jobs_command", required=True)
    listing = actions.add_parser("list", help="jobs, newest first")
    _add_filters(listing)
    listing.add_argument("--limit", default="20", help="jobs per page (default 20, at most 500)")
    listing.add_argument("--cursor", help="next_cursor printed under the previous page")
    listing.add_argument("--json", action="store_true", help=JSON_HELP)
    listing.add_argument("-q", "--quiet", action="store_true", help="the job ids alone, one a line (for scripts)")
    show = actions.add_parser("show", help="one job: plan, changes, attempts")
    show.add_argument("job_id", help=JOB_HELP)
    show.add_argument("--json", action="store_true", help=JSON_HELP)
    retry = actions.add_parser("retry", help="queue a finished job again, or every failed one (--state failed)")
    retry.add_argument("job_id", nargs="?", help=JOB_HELP + "; or leave it out and give --state failed (or dead)")
    _add_filters(retry)
    watch = actions.add_parser("watch", help="a live view: counts, latest jobs, backfill progress")
    watch.add_argument("--interval", type=float, default=1.0, help="seconds between redraws (default 1)")
    watch.add_argument("--once", action="store_true", help="draw once and stop")
    stats_parser = subparsers.add_parser("stats", help="counts per state, queue, throughput, portal budgets")
    stats_parser.add_argument("--json", action="store_true", help=JSON_HELP)
    audit = subparsers.add_parser("audit", help="binding changes of an activity, comment or job")
    target = audit.add_mutually_exclusive_group(required=True)
    target.add_argument("--activity", type=int, help="an activity id")
    target.add_argument("--comment", type=int, help="a timeline comment id")
    target.add_argument("--job", help="a job id: every change it made")
    audit.add_argument("--portal", help="only this portal's changes (its name in the rules file)")
    audit.add_argument("--json", action="store_true", help=JSON_HELP)
    undo = subparsers.add_parser("undo", help="restore the bindings a job changed, if nothing changed them since")
    undo.add_argument("job_id", help=JOB_HELP)


JSON_HELP = "print JSON, as the API answers"
JOB_HELP = "a job id, as `jobs list` shows it"
FILTER_HELP = {
    "state": "queued, running, succeeded, skipped, retrying, failed, dead or undone",
    "portal": "the portal's name in the rules file",
    "rule": "jobs in which this rule matched",
    "event": "an event name, e.g. ONCRMLEADUPDATE",
    "entity": "the event's entity id: an activity or lead id",
    "lead": "jobs about this lead: its own events and its activities'",
    "trigger": "what queued the job: webhook, backfill, reconcile or retry",
    "since": "received since: 2026-01-31, 2026-01-31T12:00 or Unix seconds",
    "until": "received until, in the same forms as --since",
}


def _add_filters(parser: argparse.ArgumentParser) -> None:
    for name in FILTERS:
        parser.add_argument(f"--{name}", help=FILTER_HELP[name])


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run one of COMMANDS; failures are put in words at the command's edge (app.exits)."""
    return asyncio.run(_dispatch(args, settings))


@asynccontextmanager
async def _redis(settings: Settings) -> AsyncIterator[Redis]:
    bundled = None
    if not settings.redis_given:
        bundled = BundledRedis(settings.data_dir)
        settings = settings.model_copy(update={"redis_url": await asyncio.to_thread(bundled.start)})
    redis = await connect(settings)
    try:
        yield redis
    finally:
        await redis.aclose()
        if bundled is not None:
            bundled.stop()  # stops only a server this command started


async def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    retention = settings.job_retention_days * 86400
    async with _redis(settings) as redis:
        store = JobStore.from_settings(redis, settings)
        if args.command == "stats":
            return _print_stats(await stats.collect(redis, store, load_service_rules(settings)), args.json)
        if args.command == "audit":
            return await _audit(args, AuditLog(redis, retention))
        if args.command == "undo":
            return await _undo(args.job_id, settings, redis, store, AuditLog(redis, retention))
        return await {"list": _list, "show": _show, "retry": _retry, "watch": _watch}[args.jobs_command](
            args, store, redis, settings)


def _filters(args: argparse.Namespace, *extra: str) -> dict[str, str]:
    return {name: str(getattr(args, name)) for name in (*FILTERS, *extra) if getattr(args, name, None)}


async def _list(args: argparse.Namespace, store: JobStore, redis: Redis, settings: Settings) -> int:
    query, limit, cursor = parse_list_query(_filters(args, "limit", "cursor"))
    page = await store.list(query, limit, cursor)
    if args.json:
        print(json.dumps({"jobs": [r.summary() for r in page.records], "next_cursor": page.next_cursor}, indent=2))
        return 0
    if args.quiet:
        print("\n".join(r.id for r in page.records))
        return 0
    if not page.records:
        print("no jobs" + (" match these filters" if _filters(args) else " yet: they appear as the portal's "
                           "events arrive (or try `b24rebind demo`)"))
        return 0
    print(_table(page.records))
    if page.next_cursor:
        print(f"\nolder jobs: --cursor {page.next_cursor}")
    return 0


def _table(records: list[JobRecord]) -> str:
    rows = [("RECEIVED", "STATE", "JOB", "PORTAL", "EVENT", "ENTITY", "WHAT HAPPENED")]
    for r in records:
        what = f"{r.outcome}: {r.error.get('what_to_do')}" if r.error and r.error.get("what_to_do") else r.outcome
        rows.append((time.strftime("%m-%d %H:%M:%S", time.localtime(r.received_at)), r.state.value, r.id,
                     r.portal, r.event, str(r.entity_id), what))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    room = _last_column_room(sum(widths) + 2 * len(widths))
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + _fit(row[-1], room)
                     for row in rows)


def _last_column_room(used: int) -> int | None:
    """What the terminal leaves for the last column; None (the full text) when the output is not a terminal."""
    if not sys.stdout.isatty():
        return None
    return max(20, shutil.get_terminal_size().columns - used)


def _fit(text: str, room: int | None) -> str:
    return text if room is None or len(text) <= room else text[:room - 1] + "…"


async def _show(args: argparse.Namespace, store: JobStore, redis: Redis, settings: Settings) -> int:
    record = await store.get(args.job_id)
    if record is None:
        raise UnknownJob(args.job_id, settings.job_retention_days)
    if args.json:
        print(record.model_dump_json(indent=2))
        return 0
    print(f"job {record.id}: {record.state.value} — {record.outcome}")
    print(f"  {record.event} {record.entity_id} on {record.portal}, {record.trigger}; rules: "
          f"{', '.join(record.rules) or 'none'}; {record.requests} portal requests")
    if record.error:
        print(f"  error {record.error.get('code')}: {record.error.get('description')}\n"
              f"  what to do: {record.error.get('what_to_do')}")
    for change in record.changes:
        item = f"activity {change['activity']}" if "activity" in change else f"comment {change.get('comment')}"
        status = {"dry_run": "(dry run: would be, nothing written)"}.get(change["status"], change["status"])
        print(f"  {item}: [{bindings_text(change['before'])}] -> [{bindings_text(change['after'])}] {status}")
    for attempt in record.attempts:
        error = f" ({attempt.error.get('code')})" if attempt.error else ""
        print(f"  attempt {attempt.number} at {time.strftime('%H:%M:%S', time.localtime(attempt.started_at))}: "
              f"{attempt.outcome}{error}")
    return 0


async def _retry(args: argparse.Namespace, store: JobStore, redis: Redis, settings: Settings) -> int:
    queue = JobQueue(redis, store)  # type: ignore[arg-type]
    if args.job_id:
        record = await store.get(args.job_id)
        if record is None:
            raise UnknownJob(args.job_id, settings.job_retention_days)
        if record.state not in FINAL_STATES:
            raise UndoRefused(f"job {args.job_id} is {record.state.value}; only a finished job can be retried")
        records = [record]
    else:
        query, _, _ = parse_list_query(_filters(args))
        if query.state not in (JobState.FAILED, JobState.DEAD):
            raise BadRequest("give a job id, or --state failed (or dead) to replay the failed jobs")
        records = (await store.list(query, 1000)).records
    for record in records:
        await queue.requeue(record)
    print(f"queued again: {len(records)} job(s)" + "".join(f"\n  {r.id}" for r in records))
    return 0


def _print_stats(answer: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps(answer, indent=2))
        return 0
    print("jobs:  " + "  ".join(f"{state} {count}" for state, count in answer["jobs"].items()))
    print(f"queue: {_queue_line(answer['queue'])}")
    print(f"throughput: {plural(answer['jobs_finished_last_minute'], 'job')} finished in the last minute, "
          f"{answer['jobs_per_minute']} received")
    for name, portal in answer["portals"].items():
        print(f"portal {name} ({portal['domain']}): {_reachability(portal['reachability'])}; "
              f"{portal['headroom']:.0f} of {portal['burst']} requests free, "
              f"{portal['per_second']}/s{' (slowed down)' if portal['slowed_down'] else ''}; "
              f"{plural(portal['requests'], 'request')} made, {portal['refused']} refused by the portal, "
              f"{portal['unreachable']} could not reach it")
    return 0


def _queue_line(queue: dict[str, Any]) -> str:
    if not queue["depth"]:
        return "empty"
    oldest = f", the oldest for {queue['oldest_queued_seconds']:.0f} s" if queue["oldest_queued_seconds"] else ""
    later = f", {queue['later']} to retry later" if queue["later"] else ""
    return (f"{queue['depth']} ({queue['live']} live, {queue['backfill']} backfill): {queue['ready']} ready"
            f"{oldest}{later}")


def _reachability(reach: dict[str, Any]) -> str:
    if reach["state"] == "unknown":
        return "not asked yet"
    seen = time.strftime("%H:%M:%S", time.localtime(reach["at"]))
    return f"{reach['state']} (seen at {seen})"


async def _watch(args: argparse.Namespace, store: JobStore, redis: Redis, settings: Settings) -> int:
    rules = load_service_rules(settings)
    away = False  # while Redis is away (restarting, say): the screen waits for it, and says so once
    while True:
        try:
            answer = await stats.collect(redis, store, rules)
            latest = (await store.list(JobQuery(), 15)).records
            backfill = (await store.list(JobQuery(trigger="backfill"), 10_000)).records
        except (RedisError, OSError) as exc:
            if args.once:
                raise
            if not away:
                away = True
                print(f"\nRedis is unreachable ({describe(exc)}); waiting for it (Ctrl-C to stop)", file=sys.stderr,
                      flush=True)
            await asyncio.sleep(args.interval)
            continue
        away = False
        screen = [f"b24rebind — {time.strftime('%H:%M:%S')} (Ctrl-C to stop)", ""]
        screen.append("  ".join(f"{state} {count}" for state, count in answer["jobs"].items()))
        screen.append(f"queue: {_queue_line(answer['queue'])}; {answer['jobs_finished_last_minute']} finished/min")
        for dry_run in (False, True):  # a dry run and a real one are two runs: never one count
            runs = [r for r in backfill if r.dry_run == dry_run]
            if runs:
                done = sum(r.state in FINAL_STATES for r in runs)
                screen.append(f"{'backfill (dry run)' if dry_run else 'backfill':<19}{progress_bar(done, len(runs))}")
        screen += ["", _table(latest)]
        if not args.once:
            print("\x1b[H\x1b[2J", end="")  # clear the terminal, then redraw
        print("\n".join(screen), flush=True)
        if args.once:
            return 0
        await asyncio.sleep(args.interval)


async def _audit(args: argparse.Namespace, log: AuditLog) -> int:
    if args.job:
        entries = await log.for_job(args.job)
    else:
        kind = "comment" if args.comment else "activity"
        entries = await log.for_item(args.comment or args.activity, kind, args.portal)
    if args.json:
        print(json.dumps([e.model_dump(mode="json") for e in entries], indent=2))
        return 0
    if not entries:
        print("no binding changes recorded")
    for e in entries:
        why = f"undo of job {e.undo_of}" if e.undo_of else f"job {e.job}, rules: {', '.join(e.rules) or '-'}"
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e.time))}  {e.portal} {e.kind} {e.item}: "
              f"[{bindings_text(e.before)}] -> [{bindings_text(e.after)}]  ({why})")
    return 0


async def _undo(job_id: str, settings: Settings, redis: Redis, store: JobStore, log: AuditLog) -> int:
    result = await undo_with_rules(job_id, log, load_service_rules(settings), redis, store,
                                   settings.job_retention_days)
    for entry in result.restored:
        print(f"{entry.kind} {entry.item}: restored [{bindings_text(entry.after)}]")
    for error in result.errors:
        print(f"could not restore {error}", file=sys.stderr)
    if result.errors:
        return 1
    record = await store.get(job_id)
    print(f"job {job_id} is now undone. " + reapply_note(record.rules if record else []))
    return 0
