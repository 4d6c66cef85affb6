"""The reconciler: converted leads whose events were missed get a job, the others cost nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis
from arq.connections import ArqRedis

from app.bitrix.client import RestClient
from app.portal_config import PortalConfig
from app.cli.backfill import BackfillRun, queue_backfill
from app.live_rules import LiveRules
from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
from app.rules.model import RuleSet
from app.settings import Settings
from app.store.jobs import JOB_KEY, JobQuery, JobRecord, JobState, JobStore
from app.store.namespace import prefixed
from app.store.queue import BACKFILL_QUEUE, LIVE_QUEUE, RESCUE_CRON, SWEEP_CRON, JobQueue
from tests.support.processes import write_rules
from workers.context import CONTEXT, WorkerContext
from workers.main import build_worker
from workers.reconcile import (
    BACKFILL_RAN,
    BACKFILL_WAITING,
    SAME_VERSION,
    TRIGGER,
    _covers,
    reconcile_command,
    reconcile_job,
    sweep,
)


@pytest.fixture
async def ctx(redis: ArqRedis, rules: RuleSet, settings: Settings) -> AsyncIterator[WorkerContext]:
    """What a worker's jobs share, as the worker makes it (JobStore with a one-hour retention)."""
    context = WorkerContext.make(settings, LiveRules(rules), redis)
    context.store = JobStore(redis, 3600)
    yield context
    await context.close()


def client_for(ctx: WorkerContext, portal_config: PortalConfig) -> RestClient:
    return RestClient(ctx.http, portal_config, ctx.limiter)


async def test_a_sweep_queues_only_converted_leads_with_activities_still_on_them(
    ctx: WorkerContext, portal: FakePortal, portal_config: PortalConfig, make_worker: Any
) -> None:
    missed = portal.add_lead(title="missed")
    stranded = [portal.add_activity([(LEAD, missed)]) for _ in range(3)]
    made = portal.convert_lead(missed)
    handled = portal.add_lead(title="handled")
    portal.convert_lead(handled, company=False)
    open_lead = portal.add_lead(title="still open")
    portal.add_activity([(LEAD, open_lead)])
    portal.reset_counters()

    result = await sweep(client_for(ctx, portal_config), JobQueue(ctx.redis, ctx.store), ctx.redis)

    assert result.leads_seen == 2 and len(result.queued) == 1
    assert portal.requests == [("crm.lead.list", 1), ("batch", 2)]
    await make_worker().run_check()
    assert all(
        portal.bindings(a) == [(CONTACT, made["contact"]), (COMPANY, made["company"])] for a in stranded
    )
    page = await ctx.store.list(JobQuery(trigger=TRIGGER))
    assert [(r.entity_id, r.state.value, r.trigger) for r in page.records] == [(missed, "succeeded", TRIGGER)]


async def test_the_next_sweep_starts_at_the_cursor_and_queues_nothing_twice(
    ctx: WorkerContext, portal: FakePortal, portal_config: PortalConfig
) -> None:
    first = portal.add_lead()
    portal.add_activity([(LEAD, first)])
    portal.convert_lead(first)
    queue = JobQueue(ctx.redis, ctx.store)
    client = client_for(ctx, portal_config)
    one = await sweep(client, queue, ctx.redis)

    second = portal.add_lead()
    portal.add_activity([(LEAD, second)])
    portal.convert_lead(second)
    two = await sweep(client, queue, ctx.redis)

    assert two.since == one.cursor
    assert len(one.queued) == 1 and len(two.queued) == 1 and one.queued != two.queued
    assert int(await ctx.redis.zcard("arq:queue")) == 2


async def test_the_cron_sweeps_once_per_interval_whichever_worker_gets_there(
    ctx: WorkerContext, portal: FakePortal
) -> None:
    lead = portal.add_lead()
    portal.add_activity([(LEAD, lead)])
    portal.convert_lead(lead)

    assert await reconcile_job({CONTEXT: ctx}) == 1
    assert await reconcile_job({CONTEXT: ctx}) == 0  # the gate holds for the interval
    assert int(await ctx.redis.zcard("arq:queue")) == 1


async def test_b24rebind_reconcile_sweeps_and_says_what_it_queued(
    redis: ArqRedis, settings: Settings, portal: FakePortal, tmp_path: Path, capsys: Any
) -> None:
    lead = portal.add_lead()
    portal.add_activity([(LEAD, lead)])
    portal.convert_lead(lead)
    rules = write_rules(tmp_path / "rules.yaml", portal)

    assert await reconcile_command(settings.model_copy(update={"rules": rules}), None) == 0

    out = capsys.readouterr().out
    assert (
        "reconcile acme: 1 leads converted since" in out
        and "1 with activities still on the lead queued" in out
    )
    assert int(await redis.zcard("arq:queue")) == 1


def converted_lead_with_activities(portal: FakePortal, activities: int = 2) -> int:
    lead = portal.add_lead()
    for _ in range(activities):
        portal.add_activity([(LEAD, lead)])
    portal.convert_lead(lead)
    return lead


async def test_a_sweep_during_a_backfill_asks_nothing_about_the_leads_it_has_queued(
    ctx: WorkerContext, portal: FakePortal, portal_config: PortalConfig
) -> None:
    queued_by_backfill = [converted_lead_with_activities(portal) for _ in range(3)]
    queue = JobQueue(ctx.redis, ctx.store)
    client = client_for(ctx, portal_config)
    await queue_backfill(BackfillRun("acme", "2000-01-01"), client, queue, ctx.redis)
    missed = converted_lead_with_activities(portal)  # converted after the backfill listed its leads
    portal.reset_counters()
    portal.method_calls.clear()

    result = await sweep(client, queue, ctx.redis)

    assert result.leads_seen == 4 and len(result.queued) == 1
    assert result.skipped == {BACKFILL_WAITING: 3}
    assert portal.method_calls["crm.activity.list"] == 1  # the missed lead only
    page = await ctx.store.list(JobQuery(trigger=TRIGGER))
    assert [r.entity_id for r in page.records] == [missed]
    assert queued_by_backfill  # their jobs are the backfill's

    portal.reset_counters()
    portal.method_calls.clear()
    again = await sweep(client, queue, ctx.redis)  # the cursor's leads come again (DATE_MODIFY >= cursor)

    assert again.skipped[SAME_VERSION] == 1 and not again.queued
    assert portal.method_calls["crm.activity.list"] == 0


async def test_a_lead_changed_after_its_backfill_job_ran_is_still_checked(
    ctx: WorkerContext, portal: FakePortal, portal_config: PortalConfig, make_worker: Any
) -> None:
    settled, changed = converted_lead_with_activities(portal), converted_lead_with_activities(portal)
    a_minute_ago = (datetime.now().astimezone() - timedelta(minutes=1)).isoformat("T", "seconds")
    for lead in (settled, changed):  # converted a minute ago: DATE_MODIFY is to the second
        portal.leads[lead]["DATE_MODIFY"] = a_minute_ago
    queue = JobQueue(ctx.redis, ctx.store)
    client = client_for(ctx, portal_config)
    await queue_backfill(BackfillRun("acme", "2000-01-01"), client, queue, ctx.redis)
    await make_worker(queue_name=BACKFILL_QUEUE).run_check()
    portal.update_lead(changed, TITLE="renamed")  # after its job ended: a new version of it
    late = portal.add_activity([(LEAD, changed)], subject="late e-mail")
    portal.reset_counters()
    portal.method_calls.clear()

    result = await sweep(client, queue, ctx.redis)

    assert result.skipped == {BACKFILL_RAN: 1}
    assert portal.method_calls["crm.activity.list"] == 1  # the changed lead only
    assert [r.entity_id for r in (await ctx.store.list(JobQuery(trigger=TRIGGER))).records] == [changed]
    await make_worker().run_check()
    assert (LEAD, changed) not in portal.bindings(late)


async def test_a_backfill_job_under_way_stands_for_its_lead(
    ctx: WorkerContext, portal: FakePortal, portal_config: PortalConfig, make_worker: Any, redis_url: str
) -> None:
    lead = converted_lead_with_activities(portal)
    [job_id] = await queue_backfill(BackfillRun("acme", "2000-01-01"), client_for(ctx, portal_config),
                                    JobQueue(ctx.redis, ctx.store), ctx.redis)
    seen: list[JobRecord] = []
    records = sync_redis.Redis.from_url(redis_url)

    def while_writing() -> None:  # the job has read its lead and writes: what a sweep now finds of it
        seen.append(JobRecord.model_validate_json(records.get(prefixed(JOB_KEY + job_id)) or b""))
    portal.before_request("crm.activity.binding.delete", while_writing)

    await make_worker(queue_name=BACKFILL_QUEUE).run_check()

    [record] = seen
    version = str(portal.leads[lead]["DATE_MODIFY"])
    assert (record.state, record.lead_version) == (JobState.RUNNING, version)
    assert _covers(record, version) == BACKFILL_RAN
    started = record.model_copy(update={"lead_version": ""})  # under way, its reads not yet answered
    assert _covers(started, version) == BACKFILL_WAITING
    records.close()


async def test_a_dry_run_backfill_does_not_stand_for_the_rules(
    ctx: WorkerContext, portal: FakePortal, portal_config: PortalConfig
) -> None:
    lead = converted_lead_with_activities(portal)
    queue = JobQueue(ctx.redis, ctx.store)
    client = client_for(ctx, portal_config)
    await queue_backfill(BackfillRun("acme", "2000-01-01", dry_run=True), client, queue, ctx.redis)

    result = await sweep(client, queue, ctx.redis)

    assert not result.skipped and len(result.queued) == 1, lead


async def test_after_redis_forgot_the_sweep_starts_where_the_last_one_known_began(
    ctx: WorkerContext, portal: FakePortal, portal_config: PortalConfig, settings: Settings, make_worker: Any
) -> None:
    from app.store.amnesia import SweepMarks
    from workers.reconcile import reconcile_after_forgetting, sweep_all

    lead = portal.add_lead()
    activities = [portal.add_activity([(LEAD, lead)]) for _ in range(2)]
    made = portal.convert_lead(lead)
    first = (await sweep_all(ctx))[0]  # a day back; queues the lead's job, which Redis then loses
    second = (await sweep_all(ctx))[0]  # from the first's cursor: the job is in hand, nothing queued
    assert len(first.queued) == 1 and second.queued == [] and second.since == first.cursor
    marks = SweepMarks(settings.data_dir)
    assert marks.last("acme") == {"since": second.since, "cursor": second.cursor}
    await ctx.redis.flushdb()  # Redis forgot: the job, its record and the sweep's cursor

    assert await reconcile_after_forgetting({CONTEXT: ctx}, "web") == 1

    [record] = (await ctx.store.list(JobQuery(trigger=TRIGGER))).records
    assert record.entity_id == lead
    await make_worker().run_check()
    assert all(portal.bindings(a) == [(CONTACT, made["contact"]), (COMPANY, made["company"])] for a in activities)
    # The regular sweep, its cursor in Redis gone, starts from the one kept on disk, not a day back.
    await ctx.redis.flushdb()
    assert (await sweep_all(ctx))[0].since == marks.last("acme")["since"] == second.cursor


async def test_a_cron_job_a_stopped_worker_left_in_its_queue_runs_on_the_next_worker_there(
    settings: Settings, rules: RuleSet, redis: ArqRedis, make_worker: Any
) -> None:
    """arq queues a cron's job on its worker's queue a little before it is due; the worker that stops
    meanwhile leaves it to whichever worker reads the queue next, here one working the queue off (burst,
    no crons of its own), which must know the function rather than fail it as unknown."""
    stopped = build_worker(settings, rules, redis, handle_signals=False)  # a live worker, with both crons
    a_minute_ago = datetime.now(timezone.utc) - timedelta(seconds=60)
    await stopped.run_cron(a_minute_ago, delay=60)  # arq's first look: when each cron runs next
    await stopped.run_cron(a_minute_ago, delay=60)  # the next: both queued, due by now
    left = [job_id.decode() for job_id in await redis.zrange(prefixed(LIVE_QUEUE), 0, -1)]
    assert sorted(job_id.rsplit(":", 1)[0] for job_id in left) == sorted([prefixed(SWEEP_CRON), prefixed(RESCUE_CRON)])

    worker = make_worker()
    await worker.async_run()

    assert (worker.jobs_complete, worker.jobs_failed) == (2, 0)  # not "function 'cron:...' not found"
