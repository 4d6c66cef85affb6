"""Neighbours: one portal's flood must not hold up the other portals of the installation (issue 22).

    .venv/bin/python -m benchmarks.neighbours [--workers 1 4] [--flood 2000] [--quiet 29] [--seconds 30]

One fake process serves 30 portals (`FakePortalHost`), each with its own budget of 2 requests a
second, burst 50, as ordinary plans have. Real worker processes (`python -m app worker`, the service
as shipped, default settings) serve all 30 from one rules file and a Redis of the benchmark's own; with
N of them the portals are split into N shards (B24_WORKER_SHARDS=N, each process one B24_WORKER_SHARD),
so each portal's jobs run in one process.

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
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any
from urllib.parse import urlencode

from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal, FakePortalHost
from app.store.jobs import JobRecord, JobStore
from app.store.queue import JobQueue, connect, shard_of, use_shards
from benchmarks.common import RULES, ROOT, free_port, pinned_redis, rss_mb, wait_for_port

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


def start_workers(count: int, redis_url: str, rules: Path, data: Path, command: str = "worker",
                  **env: str) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "REDIS_URL": redis_url, "B24_RULES": str(rules), "B24_DATA_DIR": str(data),
           "B24_RECONCILE_INTERVAL": "0", "LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT), **env}
    workers = []
    for n in range(count):
        # Worker processes split the portals into shards, one each (B24_WORKER_SHARDS, `worker --shard K`).
        shard = {"B24_WORKER_SHARDS": str(count), "B24_WORKER_SHARD": str(n)} if command == "worker" else {}
        with (data / f"{command}{n}.log").open("ab") as log:
            workers.append(subprocess.Popen([sys.executable, "-m", "app", command], cwd=ROOT, env={**env, **shard},
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return workers


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(40)
        except subprocess.TimeoutExpired:
            process.kill()


async def wait_until(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def run(workers: int, flood: int, quiet: int, seconds: int) -> dict[str, Any]:
    use_shards(workers)  # the benchmark queues as the intake would, on each portal's shard
    try:
        return await _run(workers, flood, quiet, seconds)
    finally:
        use_shards(1)


async def _run(workers: int, flood: int, quiet: int, seconds: int) -> dict[str, Any]:
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
            stop(processes)
            await redis.aclose()
    figures = {
        "workers": workers, "quiet_events": quiet * seconds, "quiet_right": len(waits),
        "portals_per_shard": [sum(shard_of(name) == k for name in names) for k in range(workers)],
        "flood_shard": shard_of(names[0]),
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
        "sizes": [r.n_commands for r in flooded.requests], "methods": dict(flooded.method_calls),
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
    if os.environ.get("BENCH_SHOW_SIZES"):
        print(f"  portal 0 commands per request {f['sizes']}")
        print(f"  portal 0 commands by method   {f['methods']}")
    if f["workers"] > 1:
        print(f"  shards               portals per shard {f['portals_per_shard']}, portal 0 on shard {f['flood_shard']}")


# ---------------------------------------------------------------- 1,000 portals, 50 active (--many)

def many_rules(path: Path, host: FakePortalHost, configured: int) -> Path:
    portals = "".join(f"""
  m{n}:
    domain: m{n}.bitrix24.com
    rest_url: {host.base_url}/m{n}/rest/1/code{n}/
    application_token: token-m{n}
    rate_limit: {{per_second: {PER_SECOND:g}, burst: {BURST}}}""" for n in range(configured))
    path.write_text(f"portals:{portals}\n{RULES}")
    return path


def event_of(n: int, activity: int, ts: int) -> bytes:
    return urlencode({"event": "ONCRMACTIVITYADD", "event_handler_id": "1", "data[FIELDS][ID]": str(activity),
                      "ts": str(ts), "auth[domain]": f"m{n}.bitrix24.com", "auth[member_id]": f"member{n}",
                      "auth[application_token]": f"token-m{n}"}).encode()


async def redis_commands(url: str) -> int:
    client = await connect(url)
    try:
        return int((await client.info("stats"))["total_commands_processed"])
    finally:
        await client.aclose()


async def idle_cost(url: str, rules: Path, data: Path, seconds: float) -> float:
    """Redis commands a second while one worker process has nothing to do (less the two INFO calls)."""
    workers = start_workers(1, url, rules, data)
    try:
        await asyncio.sleep(5)  # started, first polls made
        before = await redis_commands(url)
        await asyncio.sleep(seconds)
        return (await redis_commands(url) - before - 1) / seconds
    finally:
        stop(workers)


async def post_events(port: int, bodies: list[bytes], rate: float) -> list[float]:
    """Open loop at `rate` events a second; each answer's latency from when it was due."""
    import aiohttp

    latencies: list[float] = []
    url = f"http://127.0.0.1:{port}/bitrix/events"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256),
                                     headers={"Content-Type": "application/x-www-form-urlencoded"}) as session:
        async def post(body: bytes, due: float) -> None:
            async with session.post(url, data=body, timeout=aiohttp.ClientTimeout(total=30)) as response:
                await response.read()
                if response.status == 200:
                    latencies.append(time.perf_counter() - due)

        start = time.perf_counter()
        tasks = []
        for i, body in enumerate(bodies):
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(post(body, due)))
        await asyncio.gather(*tasks, return_exceptions=True)
    return sorted(latencies)


async def intake(url: str, rules: Path, data: Path, bodies: list[bytes], rate: float) -> list[float]:
    port = free_port()
    web = start_workers(1, url, rules, data, "serve", B24_PORT=str(port))
    try:
        wait_for_port(port, 30)
        await asyncio.sleep(1)
        return await post_events(port, bodies, rate)
    finally:
        stop(web)


async def many(configured: int, active: int, rate: float, seconds: int) -> dict[str, Any]:
    host = FakePortalHost()
    for n in range(active):
        host.add(f"m{n}", webhook_code=f"code{n}", per_second=PER_SECOND, burst=BURST)
    await host.start()
    leads = {n: [converted_lead(host.portals[f"m{n}"]) for _ in range(5)] for n in range(active)}
    figures: dict[str, Any] = {"configured": configured, "active": active, "rate": rate}
    with pinned_redis(0) as url, TemporaryDirectory() as tmp:
        data = Path(tmp)
        rules = many_rules(data / "many.yaml", host, configured)
        figures["idle_commands"] = await idle_cost(url, rules, data, 10)
        figures["idle_commands_one"] = await idle_cost(url, many_rules(data / "one.yaml", host, 1), data, 10)
        # Intake alone: 300 events a second spread over every configured portal (no worker takes them),
        # and the same with one portal configured (all events for it): the baseline of the same run.
        spread = random.Random(5)
        count = int(rate * seconds)
        for key, rules_path, portals in (("", rules, configured), ("_one", data / "one.yaml", 1)):
            bodies = [event_of(spread.randrange(portals), 10_000_000 + i, 1766000000 + i) for i in range(count)]
            latencies = await intake(url, rules_path, data, bodies, rate)
            figures[f"accepted{key}"], figures["sent"] = len(latencies), len(bodies)
            figures[f"p50_ms{key}"] = 1000 * latencies[len(latencies) // 2] if latencies else float("nan")
            figures[f"p99_ms{key}"] = 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan")
        plain = await connect(url)
        await plain.flushdb()  # the intake phase's jobs are for portals the fake does not serve
        # A worker process with 1,000 portals configured, 50 of them busy: its resident memory.
        queue = JobQueue(plain, JobStore(plain, 3600))
        worker = start_workers(1, url, rules, data)
        rss = 0.0
        try:
            expected = []
            for second in range(seconds):
                for n in range(active):
                    for _ in range(2):
                        lead, want = leads[n][spread.randrange(5)]
                        activity = host.portals[f"m{n}"].add_activity([(LEAD, lead)])
                        expected.append((host.portals[f"m{n}"], activity, want))
                        await queue.submit(JobRecord.for_event(f"m{n}", "ONCRMACTIVITYADD", activity, "many"))
                rss = max(rss, rss_mb(worker[0].pid))
                await asyncio.sleep(1)
            await wait_until(lambda: all(right(*e) for e in expected), 120)
            rss = max(rss, rss_mb(worker[0].pid))
            figures["jobs"], figures["right"] = len(expected), sum(right(*e) for e in expected)
        finally:
            stop(worker)
            await plain.aclose()
        figures["worker_rss_mb"] = rss
    await host.close()
    return figures


def report_many(f: dict[str, Any]) -> None:
    print(f"\n{f['configured']:,} portals configured, {f['active']} active")
    print(f"  idle worker          {f['idle_commands']:.1f} Redis commands/s (with 1 portal configured: "
          f"{f['idle_commands_one']:.1f})")
    print(f"  intake at {f['rate']:g}/s      {f['accepted']:,} of {f['sent']:,} accepted, p50 {f['p50_ms']:.1f} ms, "
          f"p99 {f['p99_ms']:.1f} ms   (goal p99 < 20 ms); with 1 portal configured: "
          f"{f['accepted_one']:,} accepted, p50 {f['p50_ms_one']:.1f} ms, p99 {f['p99_ms_one']:.1f} ms")
    print(f"  worker, 50 busy      {f['right']:,} of {f['jobs']:,} jobs right, peak RSS {f['worker_rss_mb']:.0f} MB "
          f"(goal < 150 MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", nargs="*", type=int, default=[1, 4])
    parser.add_argument("--flood", type=int, default=2000)
    parser.add_argument("--quiet", type=int, default=29)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--many", action="store_true",
                        help="instead: 1,000 portals configured, 50 active (idle cost, intake p99, worker RSS)")
    args = parser.parse_args()
    if args.many:
        report_many(asyncio.run(many(1000, 50, 300.0, 10)))
        return
    for workers in args.workers:
        report(asyncio.run(run(workers, args.flood, args.quiet, args.seconds)), args.quiet, args.seconds)


if __name__ == "__main__":
    main()
