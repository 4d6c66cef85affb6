"""Running the service: the web process, the worker, or both, with bundled Redis and demo portal."""
from __future__ import annotations

import asyncio
import errno
import logging
import signal
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from arq import Worker
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from app import demo, logs, loop
from app.live_rules import LiveRules, load_service_rules
from app.intake.webhook import HEADER_LIMITS
from app.rules.model import RuleSet
from app.settings import Settings
from app.store.amnesia import watching_redis_memory
from app.store import heartbeat
from app.store.bundled_redis import with_redis
from app.store.jobs import JobStore
from app.store.outage import RedisOutage, describe
from app.store.queue import backfill_queue, connect, live_queue, queues_beyond, shard_of
from app.web import create_app
from workers.main import BACKFILL_JOBS, build_worker, close_portal_traffic, shared_portal_traffic
from workers.reconcile import reconcile_command

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Roles:
    web: bool = True
    worker: bool = True
    demo_portal: bool = False  # start the demo portal when no portal is configured
    demo_story: bool = False  # `demo`: the built-in rules on the demo portal only, the real sequence played
    keep: bool = False  # `demo --keep`: stay up, the demo portal on a fixed port, for `demo convert`


@dataclass
class _Setup:
    """What `run` serves: its settings (with the bundled Redis, the playground's rules file), the rules,
    and the demo portal it started, if any (`stage` when the demo's story plays on it)."""

    settings: Settings
    live: LiveRules
    fake: demo.DemoPortal | None = None
    stage: demo.Stage | None = None


async def run(settings: Settings, roles: Roles) -> None:
    """Run until SIGINT or SIGTERM, then stop accepting, finish what was accepted, and clean up."""
    rules = demo.demo_rules() if roles.demo_story else load_service_rules(settings)  # a broken file stops us first
    async with AsyncExitStack() as stack:
        if roles.keep:
            demo.keep_playground(stack, settings)
        setup = await _rules_and_portal(stack, with_redis(settings, stack), roles, rules)
        settings, live = setup.settings, setup.live
        logs.configure(settings.log_level, [s for p in live.current.portals.values() for s in p.secrets()])
        if not live.current.portals:
            log.warning("no portal is configured in %s: events will be refused until one is", settings.rules)
        _watch_rules(stack, live)
        tasks = await _start_workers(stack, settings, live, roles) if roles.worker else []
        base_url = ""
        if roles.web:  # started last so that it stops first: no new events while the workers finish theirs
            # The demo beside a running service takes a port of its own rather than failing.
            base_url = await _start_web(stack, settings, live, any_port_if_taken=roles.demo_story)
        if not await _present_demo(stack, setup, roles, base_url):
            return
        loop.settle_heap()
        await _until_stopped(tasks)


async def _rules_and_portal(stack: AsyncExitStack, settings: Settings, roles: Roles, rules: RuleSet) -> _Setup:
    """The rules file's rules; for the demo, its own rules and portal whatever the file says; with no portal
    configured (`demo_portal`), the demo portal beside the file's rules."""
    if roles.demo_story:
        stage = await demo.start_stage(stack, settings.demo_port if roles.keep else 0)
        live = LiveRules(demo.with_demo_portal(rules, stage.config))
        if roles.keep:  # the playground: its rules in a file a person may edit, reloaded as they change
            settings = settings.model_copy(update={"rules": demo.playground_rules(settings, stage.config)})
            live = LiveRules(load_service_rules(settings), settings)
        return _Setup(settings, live, stage.fake, stage)
    live = LiveRules(rules, settings)
    if not roles.demo_portal or live.current.portals:
        return _Setup(settings, live)
    fake = await demo.start_portal(stack)
    config = demo.demo_portal_config(fake)
    live = LiveRules(demo.with_demo_portal(live.current, config), settings,
                     adapt=lambda rules: demo.with_demo_portal(rules, config))
    return _Setup(settings, live, fake)


def _watch_rules(stack: AsyncExitStack, live: LiveRules) -> None:
    """The rules file is reloaded when it changes, and on SIGHUP."""
    watcher = asyncio.create_task(live.watch())
    stack.callback(watcher.cancel)
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, live.reload)


async def _start_workers(stack: AsyncExitStack, settings: Settings, live: LiveRules,
                         roles: Roles) -> list[asyncio.Task[None]]:
    """A live and a backfill worker for each shard served, sharing one sender per portal."""
    outage = RedisOutage("worker")  # both queues' workers: one line when Redis goes, one when it is back
    # Both queues' workers hand their commands to the same sender per portal; closed after both stop.
    shared = shared_portal_traffic()
    stack.push_async_callback(close_portal_traffic, shared)
    shards = shards_served(settings, roles)
    tasks: list[asyncio.Task[None]] = []
    for shard in shards:  # one shard's queues (a `worker`), or every shard's (`run`)
        tasks.append(await _start_worker(stack, settings, live, live_queue(shard), outage,
                                         max_jobs=settings.worker_jobs, shared=shared))
        # History (backfill): its commands go after live events' and leave them half the burst.
        tasks.append(await _start_worker(stack, settings, live, backfill_queue(shard), outage,
                                         max_jobs=BACKFILL_JOBS, shared=shared))
    draining = asyncio.create_task(_drain_beyond(settings, live, shards, shared))
    stack.push_async_callback(_stop, draining)
    if not roles.web:  # the web app keeps this look itself: one per process
        watched = await connect(settings, wait=False)
        stack.push_async_callback(watched.aclose)
        await stack.enter_async_context(watching_redis_memory(watched, "worker", settings.data_dir))
    return tasks


async def _present_demo(stack: AsyncExitStack, setup: _Setup, roles: Roles, base_url: str) -> bool:
    """Say where the demo portal is, and play the demo's story on it; False when the demo is over."""
    if roles.keep:
        demo.playground_ready(setup.settings, base_url)
    if setup.fake is not None:
        demo.announce(setup.fake, base_url, story=setup.stage is not None, keep=roles.keep)
    stage = setup.stage
    if stage is None:
        return True
    redis = await connect(setup.settings)
    stack.push_async_callback(redis.aclose)
    stage.store, stage.events_url = JobStore.from_settings(redis, setup.settings), base_url + "/bitrix/events"
    await demo.play(stage)
    if not roles.keep:
        return False
    print("\nThe demo stays up (Ctrl-C stops it). Play another conversion on it from another terminal:\n"
          "  b24rebind demo convert [--activities N] [--late M] [--repeat]\n", flush=True)
    return True


def web_runner(settings: Settings, rules: LiveRules | RuleSet) -> web.AppRunner:
    """The web process's runner (benchmarks/intake.py serves through it too)."""
    # No access log: the event handler logs one line per event already, and intake is the hot path.
    # An idle kept-alive connection is closed after 15 s (aiohttp's default is 75): slots are not held by idlers.
    return web.AppRunner(create_app(settings, rules), shutdown_timeout=30, access_log=None, keepalive_timeout=15,
                         **HEADER_LIMITS)


class ShardError(Exception):
    """A worker's shard is missing or beyond the shard count; the message says what to do."""


def with_worker_shard(settings: Settings, shard: int | None) -> Settings:
    """A `worker`'s settings with its shard (`--shard K` over B24_WORKER_SHARD), checked against the count."""
    shard = settings.worker_shard if shard is None else shard
    count = settings.worker_shards
    if shard is not None and not 0 <= shard < count:
        raise ShardError(f"shard {shard} does not exist: B24_WORKER_SHARDS is {count}, so shards are 0 to "
                         f"{count - 1}. Start this worker with --shard K (K from 0 to {count - 1}), or set "
                         "B24_WORKER_SHARDS to the number of worker processes on every process.")
    if shard is None and count > 1:
        raise ShardError(f"B24_WORKER_SHARDS is {count}: say which shard this worker serves, with "
                         f"`b24rebind worker --shard K` or B24_WORKER_SHARD=K (K from 0 to {count - 1}); run one "
                         "worker per shard (docs/operations.md, \"Many portals\").")
    return settings.model_copy(update={"worker_shard": shard})


def shards_served(settings: Settings, roles: Roles) -> list[int]:
    """The shards whose queues this process serves: every one when it is web and worker at once (`run`,
    `demo`), else its own (B24_WORKER_SHARD; 0 with one shard)."""
    if roles.web or settings.worker_shards == 1:
        return list(range(settings.worker_shards))
    if settings.worker_shard is None:  # `b24rebind worker` checks this before starting (with_worker_shard)
        raise ShardError("B24_WORKER_SHARD is not set")
    return [settings.worker_shard]


async def _drain_beyond(settings: Settings, rules: LiveRules, shards: list[int], shared: dict[str, Any]) -> None:
    """Jobs left on the queues of shards the count no longer has (B24_WORKER_SHARDS lowered while they
    waited) are worked off by the worker of their shard number modulo the count, with arq's burst worker:
    nothing is moved between arq's queues, and nothing stays where no worker looks."""
    redis = await connect(settings, wait=False)
    workers: list[Worker] = []
    try:
        while True:
            try:
                beyond = await queues_beyond(redis, settings.worker_shards)
                break
            except (RedisError, OSError):  # the workers say that Redis is away; look again once it is back
                await asyncio.sleep(5)
        queues = [queue for shard in shards for queue in beyond.get(shard, [])]
        for queue in queues:
            log.warning("%s holds jobs of a shard beyond B24_WORKER_SHARDS=%d (the count was lowered): this "
                        "worker works them off", queue, settings.worker_shards)
        workers = [build_worker(settings, rules, redis, handle_signals=False, queue_name=queue, burst=True,
                                max_jobs=settings.worker_jobs, ctx=shared) for queue in queues]
        await asyncio.gather(*(worker.async_run() for worker in workers))
        for queue in queues:
            log.info("%s is empty: its jobs were worked off", queue)
    finally:  # on a stop too: a job cut off stays queued; the workers' HTTP sessions are closed
        for worker in workers:
            worker.allow_pick_jobs = False
            if worker.on_shutdown:  # a burst worker does not run its shutdown itself
                await worker.on_shutdown(worker.ctx)
        await redis.aclose()


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.wait([task], timeout=30)


class CannotListen(Exception):
    """The web process cannot take its address; the message says what to do."""


class WorkerStopped(Exception):
    """A worker ended by itself (a bug: a Redis outage only makes it wait); the message says what to do."""


async def _start_web(stack: AsyncExitStack, settings: Settings, rules: LiveRules,
                     any_port_if_taken: bool = False) -> str:
    runner = web_runner(settings, rules)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, settings.host, settings.port)
    try:
        try:
            await site.start()
        except OSError as exc:
            if not (any_port_if_taken and exc.errno == errno.EADDRINUSE):
                raise
            site = web.TCPSite(runner, settings.host, 0)
            await site.start()
            print(f"Port {settings.port} is taken (by `./scripts/start`, say), so the demo's web process takes "
                  f"port {runner.addresses[0][1]} of its own.", flush=True)
    except OSError as exc:  # most often the port is taken: by another b24rebind, say
        raise CannotListen(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}. Stop what "
                           "uses that port (another b24rebind?), or set B24_PORT (and B24_HOST) to a free "
                           "address.") from None
    host, port = runner.addresses[0][:2]
    url = f"http://{host}:{port}"
    log.info("listening on %s; portals post events to %s/bitrix/events", url, url)
    return url


async def _start_worker(stack: AsyncExitStack, settings: Settings, rules: LiveRules, queue: str,
                        outage: RedisOutage, max_jobs: int, shared: dict[str, Any]) -> asyncio.Task[None]:
    redis = await connect(settings, wait=False)  # the worker waits for a Redis that is away
    worker = build_worker(settings, rules, redis, handle_signals=False, queue_name=queue, max_jobs=max_jobs,
                          ctx=shared)
    worker.outage = outage
    task = asyncio.create_task(worker.async_run())

    async def stop() -> None:
        # Let the jobs in hand finish (the grace period), leave the rest queued.
        worker.allow_pick_jobs = False
        await asyncio.wait([asyncio.gather(*worker.tasks.values())], timeout=30)
        task.cancel()
        await worker.close()

    stack.push_async_callback(stop)
    await stack.enter_async_context(heartbeat.beating(redis, worker))  # the dashboard's workers panel
    return task


def backfill_worker(settings: Settings, rules: RuleSet, redis: ArqRedis, portal: str = "") -> Worker:
    """A worker that drains the portal's shard's backfill queue and stops: `b24rebind backfill` works off
    its own jobs."""
    return build_worker(settings, rules, redis, queue_name=backfill_queue(shard_of(portal)), burst=True,
                        handle_signals=False, max_jobs=BACKFILL_JOBS, poll_delay=0.2)


__all__ = ["CannotListen", "Roles", "ShardError", "backfill_worker", "reconcile_command", "run", "shards_served",
           "web_runner", "with_worker_shard"]


async def _until_stopped(tasks: list[asyncio.Task[None]]) -> None:
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopped.set)
    waiters = [asyncio.create_task(stopped.wait()), *tasks]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    ended = [task for task in tasks if task.done()]
    if ended and not stopped.is_set():
        error = ended[0].exception() if not ended[0].cancelled() else None
        log.error("a worker ended by itself (%s); stopping the service", describe(error) if error else "cancelled")
        raise WorkerStopped(f"a worker ended unexpectedly ({describe(error) if error else 'cancelled'}); see the "
                            "log above, and report it if it is not explained there. Start the service again.")
    log.info("stopping")
