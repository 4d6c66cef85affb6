"""Requests spent per activity re-bound, at a portal's real limit (issue 16's benchmark).

    .venv/bin/python -m benchmarks.portal_limit [--workload NAME ...] [--workers 1 4] [--fail 0.05] [--no-echoes]

The fake portal allows 2 requests a second with a burst of 50, as ordinary plans do. Each workload
runs with 1 and with 4 workers (each its own arq Worker and ctx, so its own PortalBatcher: as separate
processes are, sharing only Redis and its leaky bucket; each packs its own jobs' commands). With N
workers the portals are split into N shards (B24_WORKER_SHARDS), worker K serving shard K's queues, as
`b24rebind worker --shard K` does: the one portal's jobs all go to one of them. For each: the
REST requests the portal saw, the floor (the fewest the API allows, commands packed 50 to a batch; see
`FLOORS`), their ratio, the wall time, the time the portal's bucket takes to let those requests through
(the first 50 at once, then 2 a second), QUERY_LIMIT_EXCEEDED answers, and how many activities ended right.

Echoes are on unless `--no-echoes`: every binding write fires ONCRMACTIVITYUPDATE (protocol notes,
section 0), the rules listen to it, and the fake portal posts each to the service's real web app (its
intake) after the request, as a subscribed portal's queue does. The requests then include what the
echoes cost (no read for the echoes of writes in progress or just done, else one read each); the floor
does not, so the ratio shows it.

Workloads (docs/benchmarks.md has the floors' arithmetic):
- backfill: 200 converted leads with 1-10 activities each (1,100), bound to the lead only, and 20
  leads in progress; `queue_backfill` lists the converted leads and the backfill queue works them off.
  A live e-mail on a converted lead arrives 5 s in: the time until it is right is printed.
- backlog: 300 new e-mails at once on 100 converted leads (3 each), one ONCRMACTIVITYADD each.
- rest: one lead of 1,000 activities "converted" over REST (contact and company made, nothing attached).
- portal: one lead of 1,000 activities converted by the portal itself (every activity copied to the
  contact and company, the lead binding kept): only the unbinds are left.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import aiohttp
import redis as sync_redis
from aiohttp import web

from app.bitrix.client import RestClient
from app.portal_config import PortalConfig
from app.bitrix.ratelimit import RateLimiter
from app.cli.backfill import BackfillRun, queue_backfill
from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
from app.rules.loader import parse_rules
from app.settings import Settings
from app.store.jobs import JobRecord, JobStore
from app.web import create_app
from app.store.queue import JobQueue, backfill_queue, connect, live_queue, use_shards
from benchmarks.common import RULES
from workers.main import BACKFILL_JOBS, build_worker, close_portal_traffic, shared_portal_traffic, shutdown

REDIS_URL = os.environ.get("BENCH_LIMIT_REDIS_URL", "redis://127.0.0.1:6379/13")  # flushed by every run
PER_SECOND, BURST = 2.0, 50
LIVE_PROBE_AT = 5.0  # seconds into the backfill


def batches(commands: int) -> int:
    return math.ceil(commands / 50)


FLOORS: dict[str, int] = {
    # 5 lead pages; one activity list per lead (220 leads); per activity (1,100): its bindings read (a
    # lead's sample says "lead only", so the rest are assumed, and an assumed count is read before adding:
    # a save past 100 drops a binding without a word) and 3 writes.
    "backfill": 5 + batches(220 + 4 * 1100),
    # each activity's bindings (300), each lead's facts (4 x 100), 3 writes per activity (900).
    "backlog": batches(300 + 4 * 100 + 3 * 300),
    # facts with the first page (1), the other 19 pages (1), 1,000 binding reads (20: assumed from the
    # lead's sample, their count is read before adding, since a save past 100 drops one without a word),
    # 2,000 adds (40), 1,000 unbinds (20).
    "rest": 1 + 1 + batches(1000) + batches(2000) + batches(1000),
    # facts with the first page (1), the other pages (1), 1,000 binding reads (20), 1,000 unbinds (20).
    "portal": 1 + 1 + batches(1000) + batches(1000),
}


def limit_seconds(requests: int) -> float:
    return max(0, requests - BURST) / PER_SECOND


class Scene:
    """A workload's portal state, the jobs that start it, and what 'right' means for it."""

    def __init__(self, portal: FakePortal) -> None:
        self.portal = portal
        self.expected: dict[int, list[tuple[int, int]]] = {}  # activity -> bindings it must end with
        self.live_jobs: list[JobRecord] = []
        self.backfill = False

    def converted_lead(self, activities: int, by_portal: bool = False) -> int:
        lead = self.portal.add_lead(title="Client")
        before = [self.portal.add_activity([(LEAD, lead)]) for _ in range(activities)] if by_portal else []
        made = self.portal.convert_lead(lead)
        after = [] if by_portal else [self.portal.add_activity([(LEAD, lead)]) for _ in range(activities)]
        for activity in before + after:
            self.expected[activity] = [(CONTACT, int(made["contact"] or 0)), (COMPANY, int(made["company"] or 0))]
        self._made = made
        return lead

    def right(self) -> int:
        return sum(self.portal.bindings(a) == want for a, want in self.expected.items())


def backfill(portal: FakePortal) -> Scene:
    scene = Scene(portal)
    shuffled = random.Random(3)
    counts = [shuffled.randint(1, 10) for _ in range(200)]
    while sum(counts) != 1100:  # exactly 1,100 in all, as the workload
        i = shuffled.randrange(200)
        counts[i] = min(10, counts[i] + 1) if sum(counts) < 1100 else max(1, counts[i] - 1)
    for n in counts:
        scene.converted_lead(n)
    for _ in range(20):
        lead = portal.add_lead(title="In progress")
        portal.add_activity([(LEAD, lead)])
    scene.backfill = True
    return scene


def backlog(portal: FakePortal) -> Scene:
    scene = Scene(portal)
    for _ in range(100):
        scene.converted_lead(3)
    scene.live_jobs = [JobRecord.for_event("acme", "ONCRMACTIVITYADD", a, str(a)) for a in scene.expected]
    return scene


def conversion(by_portal: bool) -> Callable[[FakePortal], Scene]:
    def make(portal: FakePortal) -> Scene:
        scene = Scene(portal)
        lead = scene.converted_lead(1000, by_portal=by_portal)
        made = scene._made
        scene.live_jobs = [JobRecord.for_event("acme", event, int(entity or 0), "1") for event, entity in (
            ("ONCRMLEADUPDATE", lead), ("ONCRMCONTACTADD", made["contact"]), ("ONCRMCOMPANYADD", made["company"]))]
        return scene
    return make


WORKLOADS: dict[str, Callable[[FakePortal], Scene]] = {
    "backfill": backfill, "backlog": backlog, "rest": conversion(False), "portal": conversion(True)}


# The default rules, listening to activity updates too: every echo of a write reaches a job.
ECHO_RULES = RULES.replace("on: [ONCRMACTIVITYADD,", "on: [ONCRMACTIVITYADD, ONCRMACTIVITYUPDATE,")


async def _intake(settings: Settings, rules: Any, portal: FakePortal) -> web.AppRunner:
    """The service's web app on loopback, with the portal posting its echoes there."""
    runner = web.AppRunner(create_app(settings, rules), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    portal.subscribe(f"http://127.0.0.1:{runner.addresses[0][1]}/bitrix/events", "t", "acme.bitrix24.com")
    return runner


async def run(name: str, workers: int, fail: float, echoes: bool = True) -> dict[str, Any]:
    use_shards(workers)  # every job of the portal goes to its shard's queues, as with B24_WORKER_SHARDS
    try:
        return await _run(name, workers, fail, echoes)
    finally:
        use_shards(1)


async def _run(name: str, workers: int, fail: float, echoes: bool) -> dict[str, Any]:
    with sync_redis.Redis.from_url(REDIS_URL) as plain:
        plain.flushdb()
    portal = FakePortal(webhook_code="benchcode", per_second=PER_SECOND, burst=BURST)
    await portal.start()
    scene = WORKLOADS[name](portal)
    portal.reset_counters()
    portal.fail_randomly(fail, seed=7)
    config = PortalConfig(name="acme", domain="acme.bitrix24.com", rest_url=portal.rest_url,
                          application_token="t", rate_limit={"per_second": PER_SECOND, "burst": BURST})
    rules = parse_rules(ECHO_RULES if echoes else RULES, "bench rules", {}).model_copy(
        update={"portals": {"acme": config}})
    assert not echoes or ECHO_RULES != RULES, "the default rules changed: ECHO_RULES no longer adds the event"
    redis = await connect(REDIS_URL)
    probe: dict[str, Any] = {}
    with TemporaryDirectory() as tmp:
        settings = Settings(_env_file=None, redis_url=REDIS_URL, data_dir=Path(tmp), rules=Path("/nonexistent"))
        queue = JobQueue(redis, JobStore(redis, 3600))
        intake = await _intake(settings, rules, portal) if echoes else None
        started = time.perf_counter()
        for record in scene.live_jobs:
            await queue.submit(record)
        # Each worker "process" has its own ctx, so its own PortalBatcher; for a backfill, a live and a
        # backfill worker share it, as in `b24rebind worker`.
        processes = [shared_portal_traffic() for _ in range(workers)]
        if scene.backfill:
            async with aiohttp.ClientSession() as http:
                lister = RestClient(http, config, RateLimiter(redis), low_priority=True)
                await queue_backfill(BackfillRun("acme", "2000-01-01"), lister, queue, redis)
            live = [build_worker(settings, rules, redis, poll_delay=0.05, handle_signals=False, ctx=shared,
                                 queue_name=live_queue(shard)) for shard, shared in enumerate(processes)]
            history = [build_worker(settings, rules, redis, burst=True, poll_delay=0.05, handle_signals=False,
                                    queue_name=backfill_queue(shard), max_jobs=BACKFILL_JOBS, ctx=shared)
                       for shard, shared in enumerate(processes)]
            live_runs = [asyncio.create_task(worker.async_run()) for worker in live]
            probing = asyncio.create_task(_live_probe(scene, queue, started, probe))
            await asyncio.gather(*(worker.async_run() for worker in history))
            await probing
            wall = time.perf_counter() - started
            for task in live_runs:
                task.cancel()
            await asyncio.gather(*live_runs, return_exceptions=True)
            pool = live + history
        else:
            pool = [build_worker(settings, rules, redis, burst=True, poll_delay=0.05, handle_signals=False,
                                 ctx=shared, queue_name=live_queue(shard)) for shard, shared in enumerate(processes)]
            await asyncio.gather(*(worker.async_run() for worker in pool))
            wall = time.perf_counter() - started
        if echoes:  # the echoes of the last writes, and their jobs, after the workers found the queue empty
            await portal.echoes_sent(timeout=120)
            late = [build_worker(settings, rules, redis, burst=True, poll_delay=0.05, handle_signals=False,
                                 ctx=shared, queue_name=live_queue(shard)) for shard, shared in enumerate(processes)]
            await asyncio.gather(*(worker.async_run() for worker in late))
            pool += late
        if intake is not None:
            await intake.cleanup()
        for worker in pool:
            await shutdown(worker.ctx)
        for shared in processes:
            await close_portal_traffic(shared)
    figures = {"requests": portal.request_count, "floor": FLOORS[name], "wall": wall,
               "limit": limit_seconds(portal.request_count), "qle": portal.refused_for_rate,
               "right": scene.right(), "activities": len(scene.expected), **probe,
               "echoes": len(portal.echoes), "echoes_posted": portal.echoes_posted if echoes else 0,
               "writes": sum(portal.method_calls[f"crm.activity.binding.{m}"] for m in ("add", "delete", "move")),
               "sizes": [r.n_commands for r in portal.requests], "methods": dict(portal.method_calls)}
    await redis.aclose()
    await portal.close()
    return figures


async def _live_probe(scene: Scene, queue: JobQueue, started: float, probe: dict[str, Any]) -> None:
    """A live e-mail on a converted lead, LIVE_PROBE_AT seconds into the backfill: how soon it is right."""
    await asyncio.sleep(max(0.0, started + LIVE_PROBE_AT - time.perf_counter()))
    lead = next(lead for lead, fields in scene.portal.leads.items() if fields.get("STATUS_ID") == "CONVERTED")
    fields = scene.portal.leads[lead]
    activity = scene.portal.add_activity([(LEAD, lead)], subject="live e-mail")
    scene.expected[activity] = [(CONTACT, int(fields["CONTACT_ID"])), (COMPANY, int(fields["COMPANY_ID"]))]
    sent = time.perf_counter()
    await queue.submit(JobRecord.for_event("acme", "ONCRMACTIVITYADD", activity, "probe"))
    while scene.portal.bindings(activity) != scene.expected[activity] and time.perf_counter() - sent < 120:
        await asyncio.sleep(0.05)
    probe["live_event_seconds"] = time.perf_counter() - sent


def report(name: str, workers: int, fail: float, f: dict[str, Any]) -> None:
    print(f"\n{name}: {workers} workers, portal at {PER_SECOND:g}/s "
          f"burst {BURST}, {fail:.0%} of answers failing with 500")
    print(f"  REST requests        {f['requests']:>6}   floor {f['floor']:>4}   ratio {f['requests'] / f['floor']:.2f}")
    print(f"  wall time            {f['wall']:6.1f} s  the limit's time for those requests {f['limit']:.1f} s   "
          f"(for the floor: {limit_seconds(f['floor']):.1f} s)")
    print(f"  QUERY_LIMIT_EXCEEDED {f['qle']:>6}")
    print(f"  activities right     {f['right']:>6} of {f['activities']}")
    print(f"  binding writes       {f['writes']:>6}   echoes {f['echoes']} (posted to the service: {f['echoes_posted']})")
    if os.environ.get("BENCH_SHOW_SIZES"):
        print(f"  commands per request {f['sizes']}")
        print(f"  commands by method   {f['methods']}")
    if name == "backlog":  # every event is queued at the start: the wall time bounds the wait after the last
        print(f"  last activity right within {f['wall']:.1f} s of the last event")
    if "live_event_seconds" in f:
        print(f"  live e-mail during the backfill right after {f['live_event_seconds']:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="*", choices=sorted(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--workers", nargs="*", type=int, default=[1, 4])
    parser.add_argument("--fail", type=float, default=0.0, help="share of 500 answers (0.05: 5 %%)")
    parser.add_argument("--echoes", action=argparse.BooleanOptionalAction, default=True,
                        help="the portal posts ONCRMACTIVITYUPDATE for every binding write and the rules listen")
    args = parser.parse_args()
    for name in args.workload:
        for workers in args.workers:
            report(name, workers, args.fail, asyncio.run(run(name, workers, args.fail, args.echoes)))


if __name__ == "__main__":
    main()
