"""Neighbours: one portal's flood must not hold up the other portals of the installation (issue 22).

    .venv/bin/python -m benchmarks.neighbours [--workers 1 4] [--flood 2000] [--quiet 29] [--seconds 30]

One fake process serves 30 portals (`FakePortalHost`), each with its own budget of 2 requests a
second, burst 50, as ordinary plans have. Real worker processes (`python -m app worker`, the service
as shipped, default settings) serve all 30 from one rules file and a Redis of the benchmark's own.

- Portal 0 gets 2,000 e-mails at once on 200 converted leads (10 each): a mass import, about a minute
  of its own budget.
- Meanwhile each of the 29 others gets one e-mail a second for 30 s, each on a converted lead.

Printed: how long after it arrived each quiet e-mail was right (median, worst), portal 0's requests
against its floor (every command packed 50 to a batch), QUERY_LIMIT_EXCEEDED answers anywhere, and
how many activities ended right. Goals: quiet ≤ 2 s median and ≤ 5 s worst; portal 0 ≤ 1.3× its
floor; 0 QUERY_LIMIT_EXCEEDED; every activity right.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal, FakePortalHost
from app.store.jobs import JobRecord, JobStore
from app.store.queue import JobQueue, connect
from benchmarks.common import RULES, ROOT, pinned_redis

PER_SECOND, BURST = 2.0, 50
FLOOD_LEADS = 200
QUIET_LEADS = 5
FLOOD_DEADLINE = 600.0  # seconds after the flood for it to be right, at most


def floor(emails: int, leads: int) -> int:
    """As benchmarks.portal_limit's backlog: each activity's bindings, each lead's four reads, three
    writes per activity, packed 50 to a batch."""
    return math.ceil((emails + 4 * leads + 3 * emails) / 50)


def rules_file(path: Path, host: FakePortalHost) -> Path:
    portals = "".join(f"""
  {name}:
    domain: {name}.bitrix24.com
    rest_url: {portal.rest_url}
    application_token: token-{name}
    rate_limit: {{per_second: {PER_SECOND:g}, burst: {BURST}}}""" for name, portal in host.portals.items())
    path.write_text(f"portals:{portals}\n{RULES}")
    return path


def converted_lead(portal: FakePortal) -> tuple[int, set[tuple[int, int]]]:
    lead = portal.add_lead(title="Client")
    made = portal.convert_lead(lead)
    return lead, {(CONTACT, int(made["contact"] or 0)), (COMPANY, int(made["company"] or 0))}


def right(portal: FakePortal, activity: int, want: set[tuple[int, int]]) -> bool:
    return set(portal.bindings(activity)) == want


def start_workers(count: int, redis_url: str, rules: Path, data: Path) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "REDIS_URL": redis_url, "B24_RULES": str(rules), "B24_DATA_DIR": str(data),
           "B24_RECONCILE_INTERVAL": "0", "LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}
    workers = []
    for n in range(count):
        with (data / f"worker{n}.log").open("ab") as log:
            workers.append(subprocess.Popen([sys.executable, "-m", "app", "worker"], cwd=ROOT, env=env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return workers


async def wait_until(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def run(workers: int, flood: int, quiet: int, seconds: int) -> dict[str, Any]:
    host = FakePortalHost()
    names = [f"p{n}" for n in range(quiet + 1)]
    for n, name in enumerate(names):
        host.add(name, webhook_code=f"code{n}", per_second=PER_SECOND, burst=BURST)
    await host.start()
    flooded, calm = host.portals[names[0]], [host.portals[name] for name in names[1:]]
    flood_leads = [converted_lead(flooded) for _ in range(FLOOD_LEADS)]
    calm_leads = [[converted_lead(portal) for _ in range(QUIET_LEADS)] for portal in calm]
    with pinned_redis(0) as redis_url, TemporaryDirectory() as tmp:
        redis = await connect(redis_url)
        queue = JobQueue(redis, JobStore(redis, 3600))
        processes = start_workers(workers, redis_url, rules_file(Path(tmp) / "rules.yaml", host), Path(tmp))
        try:
            # Warm-up: one e-mail on every quiet portal, right before the clock starts (the workers are up).
            warm = []
            for name, portal, leads in zip(names[1:], calm, calm_leads):
                lead, want = leads[0]
                activity = portal.add_activity([(LEAD, lead)])
                warm.append((portal, activity, want))
                await queue.submit(JobRecord.for_event(name, "ONCRMACTIVITYADD", activity, "warm"))
            if not await wait_until(lambda: all(right(*w) for w in warm), 120):
                raise RuntimeError(f"the workers did not start: see {tmp}/worker*.log")
            for portal in host.portals.values():
                portal.reset_counters()
                portal.refused_for_rate = 0
            await asyncio.sleep(BURST / PER_SECOND / 4)  # the warm-up's few requests drain from the buckets

            started = time.monotonic()
            floods = []
            for i in range(flood):
                lead, want = flood_leads[i % FLOOD_LEADS]
                activity = flooded.add_activity([(LEAD, lead)], subject=f"import {i}")
                floods.append((activity, want))
                await queue.submit(JobRecord.for_event(names[0], "ONCRMACTIVITYADD", activity, "flood"))
            queued = time.monotonic() - started
            waits: list[float] = []
            quiet_jobs: list[str] = []
            pending: list[tuple[FakePortal, int, set[tuple[int, int]], float]] = []

            async def watch() -> None:
                while True:
                    now = time.monotonic()
                    for item in [p for p in pending if right(p[0], p[1], p[2])]:
                        pending.remove(item)
                        waits.append(now - item[3])
                    await asyncio.sleep(0.02)

            watcher = asyncio.create_task(watch())
            for second in range(seconds):
                tick = started + second
                await asyncio.sleep(max(0.0, tick - time.monotonic()))
                for name, portal, leads in zip(names[1:], calm, calm_leads):
                    lead, want = leads[second % QUIET_LEADS]
                    activity = portal.add_activity([(LEAD, lead)], subject=f"e-mail {second}")
                    pending.append((portal, activity, want, time.monotonic()))
                    job = JobRecord.for_event(name, "ONCRMACTIVITYADD", activity, str(second))
                    quiet_jobs.append(job.id)
                    await queue.submit(job)
            await wait_until(lambda: not pending, 60)
            watcher.cancel()
            flood_done = await wait_until(lambda: all(right(flooded, a, w) for a, w in floods),
                                          FLOOD_DEADLINE)
            flood_wall = time.monotonic() - started
            records = [r for r in await queue.store.get_many(quiet_jobs) if r and r.attempts and r.queued_at]
            in_queue = [r.attempts[0].started_at - (r.queued_at or 0) for r in records]
            running = [(r.finished_at or 0) - r.attempts[-1].started_at for r in records]
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(40)
                except subprocess.TimeoutExpired:
                    process.kill()
            await redis.aclose()
    figures = {
        "workers": workers, "quiet_events": quiet * seconds, "quiet_right": len(waits),
        "quiet_median": statistics.median(waits) if waits else float("nan"),
        "quiet_worst": max(waits) if waits else float("nan"),
        "quiet_p95": sorted(waits)[int(0.95 * (len(waits) - 1))] if waits else float("nan"),
        "flood": flood, "flood_right": sum(right(flooded, a, w) for a, w in floods), "flood_done": flood_done,
        "flood_wall": flood_wall, "flood_queued": queued,
        "requests": flooded.request_count, "floor": floor(flood, FLOOD_LEADS),
        "limit": max(0.0, flooded.request_count - BURST) / PER_SECOND,
        "qle": sum(p.refused_for_rate for p in host.portals.values()),
        "quiet_requests": sum(p.request_count for p in calm),
        "quiet_in_queue": statistics.median(in_queue) if in_queue else float("nan"),
        "quiet_running": statistics.median(running) if running else float("nan"),
    }
    await host.close()
    return figures


def report(f: dict[str, Any], quiet: int, seconds: int) -> None:
    print(f"\n{f['workers']} worker process{'es' if f['workers'] > 1 else ''}: portal 0 flooded with {f['flood']:,} "
          f"e-mails, {quiet} quiet portals with one a second for {seconds} s; each portal {PER_SECOND:g}/s burst {BURST}")
    print(f"  quiet e-mails right  {f['quiet_right']} of {f['quiet_events']}: median {f['quiet_median']:.2f} s, "
          f"p95 {f['quiet_p95']:.2f} s, worst {f['quiet_worst']:.2f} s   (goal <= 2 s median, <= 5 s worst)")
    print(f"  portal 0 requests    {f['requests']:>5}   floor {f['floor']}   ratio {f['requests'] / f['floor']:.2f}"
          f"   (goal <= 1.3)")
    print(f"  portal 0 right       {f['flood_right']:,} of {f['flood']:,} within {f['flood_wall']:.1f} s "
          f"(the limit's time for its requests: {f['limit']:.1f} s; queued in {f['flood_queued']:.1f} s)")
    print(f"  QUERY_LIMIT_EXCEEDED {f['qle']:>5}   (every portal)")
    print(f"  quiet jobs (median)  {f['quiet_in_queue']:.2f} s in the queue, {f['quiet_running']:.2f} s running; "
          f"{f['quiet_requests'] / max(1, f['quiet_events']):.1f} requests each")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", nargs="*", type=int, default=[1, 4])
    parser.add_argument("--flood", type=int, default=2000)
    parser.add_argument("--quiet", type=int, default=29)
    parser.add_argument("--seconds", type=int, default=30)
    args = parser.parse_args()
    for workers in args.workers:
        report(asyncio.run(run(workers, args.flood, args.quiet, args.seconds)), args.quiet, args.seconds)


if __name__ == "__main__":
    main()
