"""Backfill: apply the rules to history, every lead converted since a date, on a low-priority queue.

The run's cursor (the last lead queued) is kept in Redis and each lead's job id is derived from the
run, so an interrupted backfill started again continues where it stopped and queues nothing twice.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from app.bitrix.client import PAGE_SIZE, RestClient, fast_page
from app.store.backfill_runs import BackfillRun as BackfillRun
from app.store.jobs import FINAL_STATES, JobStore
from app.store.queue import JobQueue
from app.store.redis_typing import awaited

async def queue_backfill(run: BackfillRun, client: RestClient, queue: JobQueue, redis: Redis,
                         max_leads: int | None = None) -> list[str]:
    """Queue a job per converted lead after the run's cursor; returns every job id of the run so far."""
    cursor = int(await redis.get(f"{run.key}:cursor") or 0)
    queued = 0
    while max_leads is None or queued < max_leads:
        filter = {"STATUS_SEMANTIC_ID": "S", ">=DATE_MODIFY": run.since}
        page = (await client.call("crm.lead.list", fast_page(filter, ["ID"], cursor))).result or []
        for row in page[:None if max_leads is None else max_leads - queued]:
            record = run.job_for(int(row["ID"]))
            if await queue.submit(record):
                await awaited(redis.rpush(f"{run.key}:jobs", record.id))
            cursor = int(row["ID"])
            queued += 1
            await redis.set(f"{run.key}:cursor", cursor)
        if len(page) < PAGE_SIZE:
            break
    return [job_id.decode() for job_id in await awaited(redis.lrange(f"{run.key}:jobs", 0, -1))]


@dataclass
class BackfillSummary:
    jobs: int = 0
    finished: int = 0
    activities_seen: int = 0
    rebound: int = 0
    would_rebind: int = 0  # a dry run's plan
    skipped: Counter[str] | None = None
    failed: Counter[str] | None = None

    def lines(self) -> list[str]:
        out = [f"leads: {self.jobs} ({self.finished} finished)", f"activities seen: {self.activities_seen}"]
        if self.rebound or not self.would_rebind:
            out.append(f"activities re-bound: {self.rebound}")
        if self.would_rebind:
            out.append(f"dry run: would re-bind {self.would_rebind} "
                       f"{'activity' if self.would_rebind == 1 else 'activities'} (nothing was written; "
                       "`b24rebind jobs list --trigger backfill` shows each plan, before -> after)")
        out += [f"skipped ({count}): {why}" for why, count in (self.skipped or Counter()).most_common()]
        out += [f"failed ({count}): {why}" for why, count in (self.failed or Counter()).most_common()]
        return out


async def summarise(store: JobStore, job_ids: list[str]) -> BackfillSummary:
    summary = BackfillSummary(jobs=len(job_ids), skipped=Counter(), failed=Counter())
    for job_id in job_ids:
        record = await store.get(job_id)
        if record is None or record.state not in FINAL_STATES:
            continue
        summary.finished += 1
        summary.activities_seen += sum(1 for item in record.plan if "activity" in item)
        summary.rebound += sum(1 for item in record.changes if "activity" in item and item["status"] == "changed")
        summary.would_rebind += sum(1 for item in record.changes if "activity" in item and item["status"] == "dry_run")
        if record.state.value == "skipped":
            summary.skipped[record.outcome] += 1  # type: ignore[index]
        elif record.state.value in ("failed", "dead"):
            summary.failed[_error_text(record.error) or record.outcome] += 1  # type: ignore[index]
    return summary


def _error_text(error: dict[str, Any] | None) -> str:
    return f"{error.get('code')}: {error.get('what_to_do')}" if error else ""


def progress_bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // total if total else width
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
