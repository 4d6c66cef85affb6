"""Re-binding a converted lead's 1,000 activities at the portal's real limit (issue 4's benchmark).

    .venv/bin/python -m benchmarks.portal_limit [--activities 1000] [--workers 4] [--fail 0.05]

The fake portal allows 2 requests a second with a burst of 50, as ordinary plans do. The conversion
fires the events a portal would (ONCRMLEADUPDATE, ONCRMCONTACTADD, ONCRMCOMPANYADD) and four workers
share the work. Reported against baselines computed for the same run:

- the request floor: the fewest requests the API allows for the work with batches of 50, that is
  1 batch for the lead, what it became and the first page of its activities, then the other pages of
  the fast form (n // 50 more, the last one short or empty), ceil(n / 50) batches reading bindings,
  ceil(2n / 50) batches binding contact and company, and ceil(n / 50) batches unbinding the lead;
- the limit's time: how long the portal's leaky bucket takes to let that many requests through
  (the first `burst` at once, then 2 a second).
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import redis as sync_redis

from app.bitrix.portal import PortalConfig
from app.fakeportal.portal import COMPANY, CONTACT, LEAD, FakePortal
from app.rules.loader import parse_rules
from app.settings import Settings
from app.store.jobs import JobRecord, JobStore
from app.store.queue import JobQueue, connect
from benchmarks.common import RULES
from workers.main import build_worker, shutdown

REDIS_URL = os.environ.get("BENCH_LIMIT_REDIS_URL", "redis://127.0.0.1:6379/13")
PER_SECOND, BURST = 2.0, 50


def request_floor(n: int) -> int:
    pages_after_first = n // 50
    return 1 + pages_after_first + math.ceil(n / 50) + math.ceil(2 * n / 50) + math.ceil(n / 50)


def limit_seconds(requests: int) -> float:
    return max(0, requests - BURST) / PER_SECOND


async def run(activities: int, workers: int, fail: float) -> dict[str, float]:
    with sync_redis.Redis.from_url(REDIS_URL) as plain:
        plain.flushdb()
    portal = FakePortal(webhook_code="benchcode", per_second=PER_SECOND, burst=BURST)
    await portal.start()
    lead = portal.add_lead(title="Big client")
    ids = [portal.add_activity([(LEAD, lead)]) for _ in range(activities)]
    made = portal.convert_lead(lead)
    portal.reset_counters()
    portal.fail_randomly(fail, seed=7)
    config = PortalConfig(name="acme", domain="acme.bitrix24.com", rest_url=portal.rest_url,
                          application_token="t", rate_limit={"per_second": PER_SECOND, "burst": BURST})
    rules = parse_rules(RULES, "bench rules", {}).model_copy(update={"portals": {"acme": config}})
    redis = await connect(REDIS_URL)
    with TemporaryDirectory() as tmp:
        settings = Settings(_env_file=None, redis_url=REDIS_URL, data_dir=Path(tmp), rules=Path("/nonexistent"))
        queue = JobQueue(redis, JobStore(redis, 3600))
        started = time.perf_counter()
        for event, entity in (("ONCRMLEADUPDATE", lead), ("ONCRMCONTACTADD", made["contact"]),
                              ("ONCRMCOMPANYADD", made["company"])):
            await queue.submit(JobRecord.for_event("acme", event, int(entity or 0), "1"))
        pool = [build_worker(settings, rules, redis, burst=True, poll_delay=0.05, handle_signals=False)
                for _ in range(workers)]
        await asyncio.gather(*(worker.async_run() for worker in pool))
        wall = time.perf_counter() - started
        for worker in pool:
            await shutdown(worker.ctx)
    right = sum(portal.bindings(a) == [(CONTACT, made["contact"]), (COMPANY, made["company"])] for a in ids)
    never_empty = all(all(state for state in portal.binding_history[a]) for a in ids)
    figures = {"requests": portal.request_count, "floor": request_floor(activities), "wall": wall,
               "limit": limit_seconds(portal.request_count), "limit_floor": limit_seconds(request_floor(activities)),
               "qle": portal.refused_for_rate, "right": right, "never_empty": never_empty}
    await redis.aclose()
    await portal.close()
    return figures


def report(activities: int, workers: int, fail: float, f: dict[str, float]) -> None:
    print(f"\n{activities} activities, {workers} workers, portal at {PER_SECOND:g}/s burst {BURST}, "
          f"{fail:.0%} of answers failing with 500")
    print(f"  REST requests        {f['requests']:>6}   floor {f['floor']:>4}   ratio {f['requests'] / f['floor']:.2f}"
          f"   ({f['requests'] / activities:.3f} per activity; floor {f['floor'] / activities:.3f})")
    print(f"  wall time            {f['wall']:6.1f} s  the limit's time for those requests {f['limit']:.1f} s   "
          f"ratio {f['wall'] / max(f['limit'], 0.001):.2f}  (for the floor: {f['limit_floor']:.1f} s)")
    print(f"  QUERY_LIMIT_EXCEEDED {f['qle']:>6}")
    print(f"  activities right     {f['right']:>6} of {activities}; never without a binding: {f['never_empty']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activities", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--fail", type=float, default=None, help="share of 500 answers; default: 0 then 0.05")
    args = parser.parse_args()
    for fail in ([args.fail] if args.fail is not None else [0.0, 0.05]):
        report(args.activities, args.workers, fail, asyncio.run(run(args.activities, args.workers, fail)))


if __name__ == "__main__":
    main()
