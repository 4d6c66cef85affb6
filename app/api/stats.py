"""The installation at a glance: jobs per state, the queue, throughput and each portal's request budget."""
from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from app.api.metrics import COUNTERS, parse_field
from app.rules.model import RuleSet
from app.store.jobs import INDEX_PREFIX, JOB_INDEX, JobStore
from app.store.namespace import prefixed
from app.store.queue import BACKFILL_QUEUE, LIVE_QUEUE

MINUTES = 30  # throughput history the dashboard draws


async def collect(redis: Redis, store: JobStore, rules: RuleSet) -> dict[str, Any]:
    """Everything GET /api/stats answers, read from Redis in a few round trips."""
    seconds, micros = await redis.time()
    now = seconds + micros / 1e6
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcard(prefixed(LIVE_QUEUE))
        pipe.zcard(prefixed(BACKFILL_QUEUE))
        pipe.zrange(prefixed(f"{INDEX_PREFIX}state:queued"), 0, 0, withscores=True)
        for minute in range(MINUTES):
            pipe.zcount(prefixed(JOB_INDEX), now - 60 * (minute + 1), f"({now - 60 * minute}")
        pipe.hgetall(prefixed(COUNTERS))
        live, backfill, oldest, *per_minute, counters = await pipe.execute()
    return {
        "time": now,
        "jobs": await store.counts(),
        "queue": {"depth": live + backfill, "live": live, "backfill": backfill,
                  "oldest_queued_seconds": round(now - oldest[0][1], 3) if oldest else None},
        "jobs_per_minute": per_minute[0],
        "jobs_per_minute_history": per_minute[::-1],  # oldest minute first, the current one last
        "portals": await _portals(redis, rules, now, _requests_per_portal(counters)),
    }


def _requests_per_portal(counters: dict[bytes, bytes]) -> dict[str, dict[str, int]]:
    """REST calls counted by the workers (metrics), per portal: all of them and the refused ones."""
    totals: dict[str, dict[str, int]] = {}
    for raw_field, value in counters.items():
        name, labels = parse_field(raw_field.decode())
        if name == "rest_requests" and labels.get("via") == "request":
            entry = totals.setdefault(labels.get("portal", "-"), {"requests": 0, "errors": 0})
            entry["requests"] += int(value)
            entry["errors"] += int(value) if labels.get("outcome") != "ok" else 0
    return totals


async def _portals(redis: Redis, rules: RuleSet, now: float,
                   requests: dict[str, dict[str, int]]) -> dict[str, dict[str, Any]]:
    """Each portal's request budget: the shared leaky bucket's free slots right now."""
    async with redis.pipeline(transaction=False) as pipe:
        for name in rules.portals:
            pipe.hmget(prefixed(f"b24:rate:{name}"), "level", "ts")
            pipe.exists(prefixed(f"b24:rate:{name}:slow"))
        answers = await pipe.execute()
    portals = {}
    for i, (name, portal) in enumerate(rules.portals.items()):
        (level, ts), slow = answers[2 * i], bool(answers[2 * i + 1])
        rate = portal.rate_limit.per_second / (2 if slow else 1)
        used = max(0.0, float(level or 0) - (now - float(ts or now)) * rate)
        burst = portal.rate_limit.burst
        portals[name] = {"domain": portal.domain, "per_second": rate, "burst": burst, "slowed_down": slow,
                         "headroom": round(burst - used, 2), "headroom_ratio": round((burst - used) / burst, 3),
                         **requests.get(name, {"requests": 0, "errors": 0})}
    return portals
