"""Worker benchmark: single-activity jobs per second in one worker process, against an instant portal.

    .venv/bin/python -m benchmarks.worker [--jobs 1000] [--rounds 3] [--profile FILE]

Each job is ONCRMACTIVITYADD for an activity bound to a converted lead: read its bindings, the lead and
what it became, then bind the contact and company and unbind the lead. The fake portal (rate limit off)
runs in its own process on one core, the worker (as `b24rebind worker` builds it) on another; the
baseline in the same run is a plain arq worker (arq's own Redis pool) with as many slots, polling every
10 ms (its fastest), running a no-op function over the same queued jobs. Also reports
resident memory of each worker before any job and after the run. Redis is a redis-server of the
benchmark's own, on the fake portal's core. Baseline and service take turns for --rounds rounds and
the table shows the medians.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from app import loop
from benchmarks.common import (
    bench_rules,
    bench_settings,
    cpu_seconds,
    flush_bench_db,
    median_of,
    pin_to_core,
    pinned_redis,
    plain_arq_redis,
    read_json_line,
    rss_mb,
    spawn,
)

KINDS = ("baseline", "service")
EVENT = "ONCRMACTIVITYADD"


# ---------------------------------------------------------------- child processes


async def portal(jobs: int) -> None:
    """The fake portal with `jobs` converted leads, each with one activity still bound to the lead."""
    from app.fakeportal import LEAD, FakePortal

    core = pin_to_core(1)
    fake = FakePortal(per_second=None)
    activities = []
    for _ in range(jobs):
        lead = fake.add_lead(title="bench")
        fake.convert_lead(lead)
        activities.append(fake.add_activity([(LEAD, lead)], subject="bench"))
    await fake.start()
    print(json.dumps({"rest_url": fake.rest_url, "activities": activities, "core": core}), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    changed = sum(1 for a in activities if all(t != LEAD for t, _ in fake.bindings(a)))
    await fake.close()
    print(json.dumps({"activities_moved": changed, "requests": fake.request_count}), flush=True)


async def work(kind: str, rest_url: str, profile: str) -> None:
    """Build the worker, report memory, wait for `go` on stdin, then drain the queue (burst) and report."""
    from arq import Worker, func

    from app import logs
    from app.store.queue import PROCESS_EVENT, connect, deserialize, serialize
    from workers.main import build_worker

    core = pin_to_core(0)
    settings = bench_settings()
    # Logging as `b24rebind worker` sets it up, for both: arq logs each job too.
    logs.configure(settings.log_level, [s for p in bench_rules().portals.values() for s in p.secrets()])
    options: dict[str, Any] = {"burst": True, "handle_signals": False}
    # The service as shipped (build_worker's own poll delay and slots); the baseline as fast as arq goes:
    # polling every 10 ms, since with its default 0.5 s it starts at most max_jobs jobs a half second.
    if kind == "service":
        redis = await connect(settings.redis_url or "")
        worker = build_worker(settings, bench_rules(rest_url), redis, **options)
    else:  # arq as it comes: its own Redis pool (redis-py's) too
        redis = await plain_arq_redis(settings.redis_url or "")

        async def process_event(ctx: dict[str, Any], job: dict[str, Any]) -> str:
            return "succeeded"

        worker = Worker(functions=[func(process_event, name=PROCESS_EVENT)], redis_pool=redis,
                        job_serializer=serialize, job_deserializer=deserialize, keep_result=3600,
                        max_jobs=settings.worker_jobs, poll_delay=0.01, **options)
    await asyncio.sleep(1)
    print(json.dumps({"rss_idle_mb": rss_mb(), "core": core}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    profiler = None
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler(async_mode="disabled")
        profiler.start()
    start, cpu = time.perf_counter(), cpu_seconds()
    await worker.async_run()
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    if profiler is not None:
        profiler.stop()
        await asyncio.to_thread(Path(profile).write_text, profiler.output_text(color=False))
    print(json.dumps({"complete": worker.jobs_complete, "failed": worker.jobs_failed, "retried": worker.jobs_retried,
                      "elapsed": elapsed, "cpu": cpu / elapsed, "rss_after_mb": rss_mb()}), flush=True)
    await worker.close()


# ---------------------------------------------------------------- the run


async def enqueue(activities: list[int]) -> None:
    """Queue one job per activity the way the web process does (job record, then the arq entry)."""
    from app.store.jobs import JobRecord, JobStore
    from app.store.queue import JobQueue, connect

    redis = await connect(bench_settings().redis_url or "")
    queue = JobQueue(redis, JobStore(redis, 86400))
    for start in range(0, len(activities), 200):
        await asyncio.gather(*(queue.submit(JobRecord.for_event("acme", EVENT, a, str(1766000000 + a)))
                               for a in activities[start:start + 200]))
    await redis.aclose()


async def job_requests(sample: list[int]) -> float:
    """REST requests per job, read from the job records."""
    from app.store.jobs import JobRecord, JobStore
    from app.store.queue import connect

    redis = await connect(bench_settings().redis_url or "")
    store = JobStore(redis, 86400)
    records = [await store.get(JobRecord.for_event("acme", EVENT, a, str(1766000000 + a)).id) for a in sample]
    await redis.aclose()
    states = {r.state.value for r in records if r}
    assert states == {"succeeded"}, states
    return sum(r.requests for r in records if r) / len(records)


def measure(kind: str, jobs: int, profile: str) -> dict[str, Any]:
    flush_bench_db()
    fake = spawn("benchmarks.worker", "portal", str(jobs))
    try:
        setup = read_json_line(fake, timeout=120)
        worker = spawn("benchmarks.worker", "work", kind, setup["rest_url"], profile if kind == "service" else "")
        result: dict[str, Any] = {"kind": kind, **read_json_line(worker)}
        asyncio.run(enqueue(setup["activities"]))
        assert worker.stdin is not None
        portal_cpu = cpu_seconds(fake.pid)
        worker.stdin.write("go\n")
        worker.stdin.flush()
        result.update(read_json_line(worker, timeout=300))
        result["portal_cpu"] = (cpu_seconds(fake.pid) - portal_cpu) / result["elapsed"]
        worker.wait(10)
        result["jobs_per_second"] = result["complete"] / result["elapsed"]
        # CPU a job costs the worker: steadier than the rate on a machine that is also doing other work.
        result["cpu_ms_per_job"] = 1000 * result["cpu"] * result["elapsed"] / max(1, result["complete"])
        if kind == "service":
            result["requests_per_job"] = asyncio.run(job_requests(setup["activities"][:50]))
        return result
    finally:
        fake.send_signal(signal.SIGTERM)
        if kind == "service":
            result["portal"] = read_json_line(fake)
        fake.wait(10)


def table(results: dict[str, dict[str, Any]]) -> str:
    base, service = results["baseline"], results["service"]
    rows = [("jobs/s, one worker process", "jobs_per_second", "{:,.0f}"),
            ("jobs run (failed)", None, ""),
            ("worker CPU ms per job", "cpu_ms_per_job", "{:.2f}"),
            ("worker CPU busy", "cpu", "{:.0%}"),
            ("fake portal CPU busy", "portal_cpu", "{:.0%}"),
            ("RSS before any job MiB", "rss_idle_mb", "{:.1f}"),
            ("RSS after the run MiB", "rss_after_mb", "{:.1f}")]
    lines = ["| measure | baseline (arq, no-op job) | b24rebind worker | service/baseline |", "|---|---:|---:|---:|"]
    for label, key, fmt in rows:
        if key is None:
            b, s = (f"{r['complete']:,} ({r['failed']})" for r in (base, service))
            lines.append(f"| {label} | {b} | {s} | |")
            continue
        ratio = f"{service[key] / base[key]:.2f}" if base[key] else ""
        lines.append(f"| {label} | {fmt.format(base[key])} | {fmt.format(service[key])} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["portal"]:
        loop.run(portal(int(argv[1])))
        return 0
    if argv[:1] == ["work"]:
        loop.run(work(argv[1], argv[2], argv[3] if len(argv) > 3 else ""))  # the loop `b24rebind worker` uses
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="baseline and service measured this many times each")
    parser.add_argument("--profile", default="", help="write a pyinstrument profile of the service worker here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rounds = []
    with pinned_redis(1):  # beside the fake portal: the worker has its core to itself
        for _ in range(args.rounds):  # interleaved, so a slow spell of the machine hits both alike
            rounds.append({kind: measure(kind, args.jobs, args.profile) for kind in KINDS})
    results = {kind: median_of([r[kind] for r in rounds]) for kind in KINDS}
    service = results["service"]
    print(table(results))
    print(f"\nmedians of {args.rounds} interleaved rounds; service jobs/s by round: "
          + ", ".join(f"{r['service']['jobs_per_second']:,.0f}" for r in rounds))
    print(f"worker on {service['core']}, fake portal and the benchmark's own Redis on the other core; "
          f"{service['requests_per_job']:.1f} REST requests a job; portal moved "
          f"{service['portal']['activities_moved']:,} of {args.jobs:,} activities; "
          f"{time.perf_counter() - started:.0f} s in all")
    rate = service["jobs_per_second"]
    print(f"goal: >= 500 jobs/s: {'met' if rate >= 500 else 'NOT met'} ({rate:,.0f}); RSS < 100 MB: "
          f"{'met' if service['rss_after_mb'] < 100 else 'NOT met'} ({service['rss_after_mb']:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
