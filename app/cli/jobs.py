"""`b24rebind jobs list|show|retry|watch`, `stats`, `audit` and `undo`: the API's answers in a terminal.

These commands read Redis directly (REDIS_URL, or the bundled Redis of the data directory), so they
work with or without the web process running.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.api import stats
from app.api.endpoints import BadRequest, parse_list_query
from app.config import load_service_rules
from app.settings import Settings
from app.store.audit import AuditLog, UndoRefused, undo_with_rules
from app.store.bundled_redis import BundledRedis
from app.store.jobs import FINAL_STATES, JobQuery, JobRecord, JobState, JobStore
from app.store.outage import describe
from app.store.queue import JobQueue, connect

COMMANDS = ("jobs", "stats", "audit", "undo")
FILTERS = ("state", "portal", "rule", "event", "entity", "since", "until")


def add_commands(subparsers: Any) -> None:
    """Register the commands on the `b24rebind` parser."""
    jobs = subparsers.add_parser("jobs", help="list, show, retry and watch jobs")
    actions = jobs.add_subparsers(dest="jobs_command", required=True)
    listing = actions.add_parser("list", help="jobs, newest first")
    _add_filters(listing)
    listing.add_argument("--limit", default="20")
    listing.add_argument("--cursor", help="next_cursor printed under the previous page")
    listing.add_argument("--json", action="store_true")
    show = actions.add_parser("show", help="one job: plan, changes, attempts")
    show.add_argument("job_id")
    show.add_argument("--json", action="store_true")
    retry = actions.add_parser("retry", help="queue a finished job again, or every failed one (--state failed)")
    retry.add_argument("job_id", nargs="?")
    _add_filters(retry)
    watch = actions.add_parser("watch", help="a live view: counts, latest jobs, backfill progress")
    watch.add_argument("--interval", type=float, default=1.0)
    watch.add_argument("--once", action="store_true", help="draw once and stop")
    stats_parser = subparsers.add_parser("stats", help="counts per state, queue, throughput, portal budgets")
    stats_parser.add_argument("--json", action="store_true")
    audit = subparsers.add_parser("audit", help="binding changes of an activity, comment or job")
    target = audit.add_mutually_exclusive_group(required=True)
    target.add_argument("--activity", type=int)
    target.add_argument("--comment", type=int)
    target.add_argument("--job")
    audit.add_argument("--portal")
    audit.add_argument("--json", action="store_true")
    undo = subparsers.add_parser("undo", help="restore the bindings a job changed, if nothing changed them since")
    undo.add_argument("job_id")


def _add_filters(parser: argparse.ArgumentParser) -> None:
    for name in FILTERS:
        parser.add_argument(f"--{name}")


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run one of COMMANDS; the exit status is 0, 1 (refused) or 2 (bad arguments)."""
    try:
        return asyncio.run(_dispatch(args, settings))
    except (BadRequest, UndoRefused) as exc:
        print(f"b24rebind: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, BadRequest) else 1
    except KeyboardInterrupt:  # Ctrl-C ends `jobs watch`
        return 130


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
    print(_table(page.records))
    if page.next_cursor:
        print(f"\nolder jobs: --cursor {page.next_cursor}")
    return 0


def _table(records: list[JobRecord]) -> str:
    rows = [("RECEIVED", "STATE", "JOB", "PORTAL", "EVENT", "ENTITY", "WHAT HAPPENED")]
    for r in records:
        what = f"{r.outcome}: {r.error.get('what_to_do')}" if r.error and r.error.get("what_to_do") else r.outcome
        rows.append((time.strftime("%m-%d %H:%M:%S", time.localtime(r.received_at)), r.state.value, r.id,
                     r.portal, r.event, str(r.entity_id), what[:80]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows)


async def _show(args: argparse.Namespace, store: JobStore, redis: Redis, settings: Settings) -> int:
    record = await store.get(args.job_id)
    if record is None:
        raise UndoRefused(f"no job {args.job_id!r}; job records are kept for {settings.job_retention_days:g} days")
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
        print(f"  {item}: [{', '.join(change['before'])}] -> [{', '.join(change['after'])}] {change['status']}")
    for attempt in record.attempts:
        error = f" ({attempt.error.get('code')})" if attempt.error else ""
        print(f"  attempt {attempt.number} at {time.strftime('%H:%M:%S', time.localtime(attempt.started_at))}: "
              f"{attempt.outcome}{error}")
    return 0


async def _retry(args: argparse.Namespace, store: JobStore, redis: Redis, settings: Settings) -> int:
    queue = JobQueue(redis, store)  # type: ignore[arg-type]
    if args.job_id:
        record = await store.get(args.job_id)
        if record is None or record.state not in FINAL_STATES:
            raise UndoRefused(f"job {args.job_id} is {record.state.value if record else 'unknown'}; "
                              "only a finished job can be retried")
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
    queue = answer["queue"]
    oldest = f", oldest waiting {queue['oldest_queued_seconds']:.0f} s" if queue["oldest_queued_seconds"] else ""
    print(f"queue: {queue['depth']} waiting ({queue['live']} live, {queue['backfill']} backfill){oldest}")
    print(f"throughput: {answer['jobs_per_minute']} jobs in the last minute")
    for name, portal in answer["portals"].items():
        print(f"portal {name} ({portal['domain']}): {portal['headroom']:.0f} of {portal['burst']} requests free, "
              f"{portal['per_second']}/s{' (slowed down)' if portal['slowed_down'] else ''}; "
              f"{portal['requests']} requests made, {portal['errors']} refused")
    return 0


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
        screen.append(f"queue {answer['queue']['depth']}, {answer['jobs_per_minute']} jobs/min")
        if backfill:
            done = sum(r.state in FINAL_STATES for r in backfill)
            screen.append(f"backfill {_bar(done, len(backfill))}")
        screen += ["", _table(latest)]
        if not args.once:
            print("\x1b[H\x1b[2J", end="")  # clear the terminal, then redraw
        print("\n".join(screen), flush=True)
        if args.once:
            return 0
        await asyncio.sleep(args.interval)


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // total if total else width
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


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
              f"[{', '.join(e.before)}] -> [{', '.join(e.after)}]  ({why})")
    return 0


async def _undo(job_id: str, settings: Settings, redis: Redis, store: JobStore, log: AuditLog) -> int:
    result = await undo_with_rules(job_id, log, load_service_rules(settings), redis)
    for entry in result.restored:
        print(f"{entry.kind} {entry.item}: restored [{', '.join(entry.after)}]")
    for error in result.errors:
        print(f"could not restore {error}", file=sys.stderr)
    return 1 if result.errors else 0
