"""A Redis failover under a steady stream of events, with real processes on loopback.

A primary, a replica and three Sentinels; `b24rebind serve` and two `b24rebind worker`s that find the
primary through the Sentinels (REDIS_URL=redis+sentinel://…); the fake portal. Events arrive at a
steady rate, and partway the primary is `kill -9`'d, with the replica `lag` seconds behind: it
replicates through a relay that holds back what the primary sends for that long before the kill (on
loopback a replica is otherwise a fraction of a millisecond behind, and a kill finds nothing to
lose). Once the Sentinels have promoted the replica, the killed server is started again, empty, as
the new primary's replica (as a supervisor would).

The test (tests/chaos/test_failover.py) runs it with B24_REDIS_MIN_REPLICAS=1 and asserts that
nothing accepted is lost. Run as a script, it counts what a layout loses, e.g. without the replica wait:

    .venv/bin/python -m tests.support.failover --min-replicas 0 --rate 50 --seconds 15 --kill-at 5
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from redis.exceptions import RedisError

from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
from app.store.jobs import JobStore
from app.store.queue import STRANDED_AFTER, JobQueue, connect
from tests.support.processes import ROOT, ServiceProcess, WorkerProcess, free_port, write_rules
from tests.support.replication import ReplicatedRedis
from tests.conftest import WEBHOOK_CODE, event_form

FINAL = {"succeeded", "skipped", "failed", "dead", "undone"}


@dataclass
class FailoverRun:
    """What happened: every event posted, what the service answered, and what became of it."""

    min_replicas: int
    rate: float
    lag: float  # how far behind the replica was when the primary died (its link stalled this long before)
    sent: int = 0
    accepted: dict[str, int] = field(default_factory=dict)  # job id -> its activity
    spooled: int = 0
    refused: list[tuple[int, str]] = field(default_factory=list)
    failover_seconds: float | None = None  # from the kill to the Sentinels' majority naming the replica
    stream_seconds: float = 0.0  # from the first event posted to the last answer
    states: dict[str, str | None] = field(default_factory=dict)  # job id -> its record's state (None: gone)
    wrong: list[int] = field(default_factory=list)  # accepted activities not bound as the rules say
    changed_twice: list[int] = field(default_factory=list)
    logs: dict[str, str] = field(default_factory=dict)
    alive: bool = True
    rescued: int = 0  # stranded jobs the rescue queued again
    diagnosis: dict[str, list[object]] = field(default_factory=dict)  # job -> [arq job, queue score, in progress, result]
    command: str = ""  # `b24rebind jobs show` of the last job, through the Sentinels after the failover
    exits: dict[str, int | None] = field(default_factory=dict)

    @property
    def lost(self) -> list[str]:
        """Events answered 200 whose job never finished: their record is gone, or never ran."""
        return [job for job, state in self.states.items() if state not in FINAL]

    def summary(self) -> str:
        return (f"min_replicas={self.min_replicas}: {self.sent} events at {self.rate:g}/s (all answered within "
                f"{self.stream_seconds:.1f} s; replica {self.lag:g} s behind at the kill), {len(self.accepted)} "
                f"answered 200 ({self.spooled} spooled), {len(self.refused)} refused; failover took "
                f"{self.failover_seconds if self.failover_seconds is None else round(self.failover_seconds, 1)} s; "
                f"{self.rescued} stranded and rescued; lost {len(self.lost)}, activities wrong {len(self.wrong)}, "
                f"changed twice {len(self.changed_twice)}")


async def _post(http: aiohttp.ClientSession, url: str, run: FailoverRun, activity: int) -> None:
    run.sent += 1
    body = event_form("ONCRMACTIVITYADD", activity, ts=1766047124 + activity)
    try:
        async with http.post(url, data=body, headers={"Content-Type": "application/x-www-form-urlencoded"}) as answer:
            payload = await answer.json(content_type=None)
            status = answer.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        run.refused.append((0, type(exc).__name__))
        return
    if status != 200:
        run.refused.append((status, json.dumps(payload)[:200]))
        return
    run.accepted[payload["job_id"]] = activity
    run.spooled += bool(payload.get("spooled"))


async def _until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def run_failover(directory: Path, portal: FakePortal, *, min_replicas: int, rate: float, seconds: float,
                       kill_at: float, lag: float = 1.0, settle: float = 240) -> FailoverRun:
    run = FailoverRun(min_replicas, rate, lag)
    servers = ReplicatedRedis(directory, sentinels=3, link=True)
    assert servers.link is not None
    await servers.link.start()
    await asyncio.to_thread(servers.start)
    rules = write_rules(directory / "rules.yaml", portal, per_second=200, burst=100)
    port = free_port()
    extra = {"B24_REDIS_MIN_REPLICAS": str(min_replicas)}
    processes = [ServiceProcess("serve", servers.sentinel_url, rules, directory, "serve", B24_PORT=str(port), **extra),
                 *(WorkerProcess(servers.sentinel_url, rules, directory, f"worker{i}", **extra) for i in range(2))]
    redis = await connect(servers.sentinel_url, wait=False)  # the test's own view follows the primary too
    try:
        for process in processes:
            process.start()
        # Leads converted before the stream, each with an activity that came after: bound to the lead only.
        activities = []
        for _ in range(int(rate * seconds)):
            lead = portal.add_lead()
            portal.convert_lead(lead)
            activities.append(portal.add_activity([(LEAD, lead)]))
        url = f"http://127.0.0.1:{port}"
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=200)) as http:
            async def web_up() -> bool:
                try:
                    async with http.get(url + "/healthz") as answer:
                        return answer.status == 200
                except aiohttp.ClientError:
                    return False

            await _until(web_up, 60, "the web process")
            started = time.monotonic()
            posts: list[asyncio.Task[None]] = []
            recovery: asyncio.Task[None] | None = None
            for index, activity in enumerate(activities):  # a steady pace, whatever each answer takes
                await asyncio.sleep(max(0.0, started + index / rate - time.monotonic()))
                if time.monotonic() - started >= kill_at - lag:
                    servers.link.stall()  # the replica falls behind: what the primary writes now, it never gets
                if recovery is None and time.monotonic() - started >= kill_at:
                    servers.primary.signal(signal.SIGKILL)
                    servers.link.cut()
                    recovery = asyncio.create_task(_recover(servers, run))
                posts.append(asyncio.create_task(_post(http, url + "/bitrix/events", run, activity)))
            await asyncio.gather(*posts)
            run.stream_seconds = time.monotonic() - started
            assert recovery is not None, "the stream ended before the primary was killed"
            await recovery
            await _settle(run, redis, directory, settle)
            if any(state is not None and state not in FINAL for state in run.states.values()):
                # A job that ran on the old primary during the stall, and whose re-written start the new
                # primary got after its end (arq's, retried there), is left queued with no arq job: the
                # minute's rescue queues it again once STRANDED_AFTER has passed. Run it as it will run then.
                later = time.time() + STRANDED_AFTER + 1
                run.rescued = len(await JobQueue(redis, JobStore(redis, 3600)).requeue_stranded(now=later))
                await _settle(run, redis, directory, settle)
            if run.accepted:
                run.command = await _jobs_show(list(run.accepted)[-1], servers.sentinel_url, directory)
            for job in run.lost[:5]:  # what Redis holds of a job that did not finish
                async with redis.pipeline(transaction=False) as pipe:
                    pipe.exists(f"arq:job:{job}").zscore("arq:queue", job).exists(f"arq:in-progress:{job}")
                    pipe.exists(f"arq:result:{job}")
                    run.diagnosis[job] = await pipe.execute()
        run.alive = all(process.alive() for process in processes)
    finally:
        for process in processes:
            run.exits[process.log.name] = await asyncio.to_thread(process.stop)
        run.logs = {process.log.name: process.log.read_text(errors="replace") for process in processes}
        await redis.aclose()
        servers.link.cut()
        await asyncio.to_thread(servers.stop)
    for job, activity in run.accepted.items():
        lead = next(i for t, i in portal.binding_history[activity][0] if t == LEAD)
        expected = [(CONTACT, int(portal.leads[lead]["CONTACT_ID"])), (COMPANY, int(portal.leads[lead]["COMPANY_ID"]))]
        if portal.bindings(activity) != expected or not all(portal.binding_history[activity]):
            run.wrong.append(activity)
        history = portal.binding_history[activity]
        if len(set(history)) != len(history):
            run.changed_twice.append(activity)
    return run


async def _jobs_show(job_id: str, redis_url: str, directory: Path) -> str:
    """What `b24rebind jobs show --json` prints (or its error), run as an operator runs it."""
    env = {**os.environ, "REDIS_URL": redis_url, "B24_DATA_DIR": str(directory), "LOG_LEVEL": "WARNING"}
    shown = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "app", "jobs", "show", job_id, "--json"],
                                    cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    return shown.stdout if shown.returncode == 0 else f"exit {shown.returncode}: {shown.stderr}"


async def _recover(servers: ReplicatedRedis, run: FailoverRun) -> None:
    """Time the failover, then start the killed server again, empty, as the new primary's replica."""
    killed_at = time.monotonic()
    while not await asyncio.to_thread(servers.failed_over):
        if time.monotonic() - killed_at > 120:
            raise AssertionError(f"the Sentinels did not promote the replica:\n{servers.logs()}")
        await asyncio.sleep(0.1)
    run.failover_seconds = time.monotonic() - killed_at
    servers.rejoin()


async def _settle(run: FailoverRun, redis: object, directory: Path, timeout: float) -> None:
    """Wait until the spool is empty and every accepted job has finished, or nothing has moved for 30 s
    (what a failover lost never finishes); then note each job's state."""
    store = JobStore(redis, 3600)  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout
    last: dict[str, str | None] = {}
    last_change = time.monotonic()
    while time.monotonic() < deadline:
        try:
            states = {}
            for job in run.accepted:
                record = await store.get(job)
                states[job] = record.state.value if record else None
        except (RedisError, OSError):
            await asyncio.sleep(0.5)
            continue
        spooled = list((directory / "spool").glob("spool-*.jsonl"))
        if states != last:
            last, last_change = states, time.monotonic()
        if not spooled and all(state in FINAL for state in states.values()):
            break
        if not spooled and time.monotonic() - last_change > 30:
            break
        await asyncio.sleep(0.5)
    run.states = last


async def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-replicas", type=int, default=0)
    parser.add_argument("--rate", type=float, default=50, help="events a second")
    parser.add_argument("--seconds", type=float, default=15, help="how long the stream lasts")
    parser.add_argument("--kill-at", type=float, default=5, help="seconds into the stream the primary dies")
    parser.add_argument("--lag", type=float, default=1.0,
                        help="seconds the replica's link is stalled before the kill (0: loopback's own lag)")
    parser.add_argument("--keep", action="store_true", help="keep the servers' and processes' logs, and say where")
    options = parser.parse_args()
    portal = FakePortal(webhook_code=WEBHOOK_CODE, per_second=None)
    await portal.start()
    directory = Path(tempfile.mkdtemp(prefix="b24failover"))
    try:
        run = await run_failover(directory, portal, min_replicas=options.min_replicas, rate=options.rate,
                                 seconds=options.seconds, kill_at=options.kill_at, lag=options.lag)
    finally:
        await portal.close()
        if options.keep:
            print(f"logs in {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    print(run.summary())
    print("states of the jobs answered 200:", dict(Counter(run.states.values())))
    if run.lost:
        print("lost:", *[f"{job} (activity {run.accepted[job]}, {run.states[job]})" for job in run.lost[:20]])
        print("arq's keys of the first (job, queue score, in progress, result):", run.diagnosis)
    for name, text in run.logs.items():
        lines = [line for line in text.splitlines() if '"WARNING"' in line or '"ERROR"' in line or "Traceback" in line]
        print(f"{name}: {len(lines)} warnings or errors", *lines[:6], sep="\n  ")


if __name__ == "__main__":
    asyncio.run(_main())
