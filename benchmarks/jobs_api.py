"""Job API benchmark: `GET /api/jobs?state=failed` with 10,000 job records stored.

    .venv/bin/python -m benchmarks.jobs_api [--records 10000] [--failed-share 0.1] [--requests 300]

Stores the records through `JobStore` (so its indexes are the real ones) in Redis db 14, serves the
real `create_app` on a local port, and times the call with an aiohttp client. The baseline, measured
in the same run over the same HTTP stack, is a bare handler doing only the raw Redis work a page needs
(ZREVRANGE of the failed index, 50 ids, and one MGET of those records) and returning the bytes.
The ratio is service / baseline. Server and client share one event loop, so latencies include both.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import aiohttp
from aiohttp import web

from app.store.jobs import JOB_KEY, JobRecord, JobState, JobStore
from app.store.queue import connect
from app.web import create_app
from benchmarks.common import REDIS_URL, bench_rules, bench_settings, flush_bench_db, free_port

PAGE = 50
TARGET_MS = 50.0


async def seed(records: int, failed_share: float) -> int:
    """Store `records` job records received over the last day; returns how many failed."""
    redis = await connect(REDIS_URL)
    store = JobStore(redis, 14 * 86400)
    start, failed = time.time() - 86400, 0
    states = [JobState.SUCCEEDED, JobState.SKIPPED, JobState.SUCCEEDED, JobState.DEAD]
    for i in range(records):
        lead, contact = {"entity_type": 1, "entity_id": i}, {"entity_type": 3, "entity_id": i}
        is_failed = i % round(1 / failed_share) == 0  # evenly spread over the day
        state = JobState.FAILED if is_failed else states[i % len(states)]
        failed += is_failed
        record = JobRecord(id=f"bench{i:06d}", portal="acme", event="ONCRMACTIVITYADD", entity_id=i,
                           received_at=start + i * 86400 / records, state=state, rules=["rule-a"],
                           plan=[{"activity": i, "before": [lead], "after": [contact]}],
                           changes=[{"activity": i, "before": [lead], "after": [contact],
                                     "status": "changed", "errors": []}], outcome="re-bound 1 item")
        await store.save(record)
    await redis.aclose()
    return failed


def baseline_app() -> web.Application:
    """The floor: the same Redis reads a page of failed jobs needs, no parsing, no filtering."""
    app = web.Application()

    async def redis_ctx(app: web.Application) -> Any:
        app["redis"] = await connect(REDIS_URL)
        yield
        await app["redis"].aclose()

    async def handler(request: web.Request) -> web.Response:
        redis = app["redis"]
        ids = await redis.zrevrange("b24:jobs:state:failed", 0, PAGE)
        raws = await redis.mget([JOB_KEY + job_id.decode() for job_id in ids])
        return web.Response(body=b"[" + b",".join(raw for raw in raws if raw) + b"]",
                            content_type="application/json")

    app.cleanup_ctx.append(redis_ctx)
    app.router.add_get("/api/jobs", handler)
    return app


async def time_requests(app: web.Application, requests: int) -> list[float]:
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}/api/jobs?state=failed"
    timings = []
    async with aiohttp.ClientSession() as http:
        for i in range(requests + 20):
            began = time.perf_counter()
            async with http.get(url) as response:
                assert response.status == 200, await response.text()
                await response.read()
            if i >= 20:  # the first requests warm connections and caches
                timings.append((time.perf_counter() - began) * 1000)
    await runner.cleanup()
    return timings


def summary(timings: list[float]) -> dict[str, float]:
    ordered = sorted(timings)
    return {"median": statistics.median(ordered), "p95": ordered[int(len(ordered) * 0.95) - 1],
            "max": ordered[-1]}


async def main(records: int, failed_share: float, requests: int) -> None:
    flush_bench_db()
    began = time.perf_counter()
    failed = await seed(records, failed_share)
    print(f"stored {records:,} job records ({failed:,} failed) in {time.perf_counter() - began:.1f} s")
    service = summary(await time_requests(create_app(bench_settings(), bench_rules()), requests))
    base = summary(await time_requests(baseline_app(), requests))
    print(f"\nGET /api/jobs?state=failed (page of {PAGE}), {requests} requests each, ms:")
    print(f"{'':10}{'median':>9}{'p95':>9}{'max':>9}")
    for name, row in (("baseline", base), ("service", service)):
        print(f"{name:10}" + "".join(f"{row[k]:9.2f}" for k in ("median", "p95", "max")))
    print(f"ratio service/baseline (median): {service['median'] / base['median']:.2f}x; "
          f"target p95 < {TARGET_MS:g} ms: {'met' if service['p95'] < TARGET_MS else 'NOT met'}")
    flush_bench_db()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--failed-share", type=float, default=0.1)
    parser.add_argument("--requests", type=int, default=300)
    options = parser.parse_args()
    asyncio.run(main(options.records, options.failed_share, options.requests))
