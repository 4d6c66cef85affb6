"""Redis pool benchmark: CPU a command costs through the service's pool and through redis-py's own.

    .venv/bin/python -m benchmarks.redis_pool [--commands 10000] [--rounds 5]

Twenty tasks at once (as a worker's jobs) send a short command (GET) and, separately, the job
record's save (one EVAL of 28 arguments, `JobStore.save`), through `app.store.queue.connect` (the lean
pool, app/store/redis_pool.py) and through redis-py's pool as arq builds it (the baseline), taking turns
for --rounds rounds on the loop the service runs on. Redis is a redis-server of the benchmark's own,
on the other core.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from app import loop
from app.store.jobs import JobRecord, JobStore
from app.store.queue import connect
from benchmarks.common import bench_redis_url, flush_bench_db, pin_to_core, pinned_redis, plain_arq_redis

POOLS = ("redis-py's pool", "lean pool")
TASKS = 20


def get(redis: Any) -> Callable[[int], Awaitable[Any]]:
    return lambda _: redis.get("bench:pool")


def record_save(redis: Any) -> Callable[[int], Awaitable[Any]]:
    store = JobStore(redis, 600)
    records = [JobRecord.for_event("acme", "ONCRMACTIVITYADD", i, "1766000000") for i in range(TASKS)]
    return lambda task: store.save(records[task])


COMMANDS = {"GET": get, "job record save (EVAL)": record_save}


async def cpu_per_command(pool: str, command: str, commands: int) -> float:
    """Microseconds of this process's CPU per command."""
    url = bench_redis_url()
    redis = await connect(url) if pool == "lean pool" else await plain_arq_redis(url)
    send = COMMANDS[command](redis)

    async def client(task: int) -> None:
        for _ in range(commands // TASKS):
            await send(task)

    started = time.process_time()
    await asyncio.gather(*(client(task) for task in range(TASKS)))
    cpu = time.process_time() - started
    await redis.aclose()
    return 1e6 * cpu / commands


async def measure(commands: int, rounds: int) -> dict[tuple[str, str], list[float]]:
    results: dict[tuple[str, str], list[float]] = {(c, p): [] for c in COMMANDS for p in POOLS}
    for _ in range(rounds):  # interleaved, so a slow spell of the machine hits both alike
        for command, pool in results:
            results[command, pool].append(await cpu_per_command(pool, command, commands))
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.redis_pool", description=__doc__.split("\n")[0])
    parser.add_argument("--commands", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with pinned_redis(1):
        flush_bench_db()
        pin_to_core(0)
        results = loop.run(measure(args.commands, args.rounds))
    print("| command | pool | CPU µs each (median) | rounds | against redis-py's pool |\n|---|---|---:|---|---:|")
    for command in COMMANDS:
        base = statistics.median(results[command, POOLS[0]])
        for pool in POOLS:
            figures = results[command, pool]
            print(f"| {command} | {pool} | {statistics.median(figures):.0f} | "
                  f"{', '.join(f'{x:.0f}' for x in figures)} | {statistics.median(figures) / base:.2f} |")
    print(f"\n{args.commands:,} commands a round from {TASKS} tasks at once, {args.rounds} interleaved rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
