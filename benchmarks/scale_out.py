"""Scale-out: two web processes and four worker processes on one machine, one portal limit between them.

    .venv/bin/python -m benchmarks.scale_out [--activities 150] [--per-second 20] [--burst 50]

Every process is a real `b24rebind serve` or `b24rebind worker`, sharing one Redis (database 13,
or BENCH_SCALE_REDIS_URL). The fake portal (in this process) enforces its own leaky bucket, so a
`QUERY_LIMIT_EXCEEDED` here would mean the processes together overran it. Events go to the two web
processes in turn. Reported against the same run's baseline: the time the portal's limit needs for
the requests that were made.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import redis as sync_redis

from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
from benchmarks.common import DOMAIN, TOKEN, event_body, free_port, wait_for_port

REDIS_URL = os.environ.get("BENCH_SCALE_REDIS_URL", "redis://127.0.0.1:6379/13")


def rules_text(rest_url: str, per_second: float, burst: int) -> str:
    return f"""portals:
  acme:
    domain: {DOMAIN}
    rest_url: {rest_url}
    application_token: {TOKEN}
    rate_limit: {{per_second: {per_second}, burst: {burst}}}
rules:
  - name: converted-lead-history-follows-client
    on: [ONCRMACTIVITYADD]
    when: {{bound_to: lead, lead_status: converted}}
    do: [{{bind: [lead.contact, lead.company]}}, {{unbind: lead}}]
"""


def start(role: str, env: dict[str, str], port: int | None = None) -> subprocess.Popen[bytes]:
    extra = {"B24_PORT": str(port)} if port else {}
    return subprocess.Popen([sys.executable, "-m", "app", role], env={**env, **extra},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def run(activities: int, per_second: float, burst: int) -> dict[str, float]:
    with sync_redis.Redis.from_url(REDIS_URL) as plain:
        plain.flushdb()
    portal = FakePortal(webhook_code="scalecode", per_second=per_second, burst=burst)
    await portal.start()
    cases = []
    for _ in range(activities):
        lead = portal.add_lead()
        made = portal.convert_lead(lead)
        cases.append((portal.add_activity([(LEAD, lead)]), [(CONTACT, made["contact"]), (COMPANY, made["company"])]))
    portal.reset_counters()
    with tempfile.TemporaryDirectory() as tmp:
        rules = Path(tmp) / "rules.yaml"
        rules.write_text(rules_text(portal.rest_url, per_second, burst))
        env = {**os.environ, "REDIS_URL": REDIS_URL, "B24_RULES": str(rules), "LOG_LEVEL": "WARNING",
               "B24_RECONCILE_INTERVAL": "0", "B24_DATA_DIR": tmp}
        ports = [free_port(), free_port()]
        processes = [start("serve", env, port) for port in ports] + [start("worker", env) for _ in range(4)]
        try:
            for port in ports:
                wait_for_port(port)
            started = time.perf_counter()
            async with aiohttp.ClientSession() as http:
                for n, (activity, _) in enumerate(cases):
                    url = f"http://127.0.0.1:{ports[n % 2]}/bitrix/events"
                    async with http.post(url, data=event_body(activity, 1000 + n),
                                         headers={"Content-Type": "application/x-www-form-urlencoded"}) as answer:
                        assert answer.status == 200, await answer.text()
            while sum(portal.bindings(a) == want for a, want in cases) < activities:
                if time.perf_counter() - started > 600:
                    break
                await asyncio.sleep(0.2)
            wall = time.perf_counter() - started
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=30)
    right = sum(portal.bindings(a) == want for a, want in cases)
    requests = portal.request_count
    await portal.close()
    return {"requests": requests, "wall": wall, "limit": max(0.0, requests - burst) / per_second,
            "qle": portal.refused_for_rate, "right": right}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activities", type=int, default=150)
    parser.add_argument("--per-second", type=float, default=20.0)
    parser.add_argument("--burst", type=int, default=50)
    args = parser.parse_args()
    figures = asyncio.run(run(args.activities, args.per_second, args.burst))
    print(f"2 web + 4 worker processes, portal at {args.per_second:g}/s burst {args.burst}, "
          f"{args.activities} single-activity events")
    print(f"  REST requests        {figures['requests']:>6}")
    print(f"  wall time            {figures['wall']:6.1f} s   the limit's time for those requests "
          f"{figures['limit']:.1f} s   ratio {figures['wall'] / max(figures['limit'], 0.001):.2f}")
    print(f"  QUERY_LIMIT_EXCEEDED {figures['qle']:>6}")
    print(f"  activities right     {figures['right']:>6} of {args.activities}")


if __name__ == "__main__":
    main()
