"""Redis pool benchmark: CPU a short command costs through the service's pool and through redis-py's own.

    .venv/bin/python -m benchmarks.redis_pool [--commands 20000] [--rounds 5]

Twenty tasks send GETs at once (as a worker's jobs do), through `app.queue.connect` (the pool with
the quick checkout, app/redis_pool.py) and through redis-py's pool as arq builds it (the baseline),
taking turns for --rounds rounds on the loop the service runs on. Redis is a redis-server of the
benchmark's own, on the other core.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from app import loop
from app.queue import connect
from benchmarks.common import bench_redis_url, flush_bench_db, pin_to_core, pinned_redis

KINDS = ("redis-py's pool", "quick checkout")
TASKS = 20


async def cpu_per_command(kind: str, commands: int) -> float:
    """Microseconds of this process's CPU per GET."""
    from arq import create_pool
    from arq.connections import RedisSettings

    url = bench_redis_url()
    redis = await connect(url) if kind == "quick checkout" else await create_pool(RedisSettings.from_dsn(url))
    await redis.set("bench:pool", "x" * 64)

    async def client() -> None:
        for _ in range(commands // TASKS):
            await redis.get("bench:pool")

    started = time.process_time()
    await asyncio.gather(*(client() for _ in range(TASKS)))
    cpu = time.process_time() - started
    await redis.aclose()
    return 1e6 * cpu / commands


async def measure(commands: int, rounds: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(rounds):  # interleaved, so a slow spell of the machine hits both alike
        for kind in KINDS:
            results[kind].append(await cpu_per_command(kind, commands))
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.redis_pool", description=__doc__.split("\n")[0])
    parser.add_argument("--commands", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with pinned_redis(1):
        flush_bench_db()
        pin_to_core(0)
        results = loop.run(measure(args.commands, args.rounds))
    base, quick = (statistics.median(results[kind]) for kind in KINDS)
    print("| pool | CPU µs per GET (median) | rounds | against redis-py's |\n|---|---:|---|---:|")
    for kind, figure in zip(KINDS, (base, quick)):
        rounds = ", ".join(f"{x:.0f}" for x in results[kind])
        print(f"| {kind} | {figure:.0f} | {rounds} | {figure / base:.2f} |")
    print(f"\n{args.commands:,} GETs a round from {TASKS} tasks at once, {args.rounds} interleaved rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
