"""The installation at a glance: jobs per state, the queue, throughput and each portal's request budget."""
from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis

from app.store.counters import COUNTERS, REACHABILITY, parse_field
from app.store.counters import MINUTES as MINUTES_KEY
from app.portal_config import PortalConfig
from app.rules.model import RuleSet
from app.store import heartbeat
from app.store.jobs import INDEX_PREFIX, JOB_INDEX, JobStore
from app.store.namespace import prefixed
from app.store.queue import backfill_queue, live_queue, shard_count

MINUTES = 30  # jobs received per minute, for `jobs_per_minute_history`
HOUR = 60  # minutes of events, finished jobs and portal requests, for the dashboard's chart
SERIES = ("events", "jobs", "requests")


async def collect(redis: Redis, store: JobStore, rules: RuleSet) -> dict[str, Any]:
    """Everything GET /api/stats answers, read from Redis in a few round trips."""
    seconds, micros = await redis.time()
    now = seconds + micros / 1e6
    this_minute = int(now // 60)
    shards = shard_count()  # B24_WORKER_SHARDS: each shard's queues, summed, and each shown
    answers = await _read_in_one_trip(redis, now, shards)
    depths, (oldest, *rest) = answers[:4 * shards], answers[4 * shards:]
    by_shard = [{"shard": shard, "live": depths[4 * shard], "backfill": depths[4 * shard + 2]} for shard in range(shards)]
    live, backfill = sum(depths[0::4]), sum(depths[2::4])
    live_ready, backfill_ready = sum(depths[1::4]), sum(depths[3::4])
    per_minute, minutes, counters = rest[:MINUTES], rest[MINUTES:-1], rest[-1]
    history = {series: [int(float(m.get(series.encode(), 0))) for m in minutes] for series in SERIES}
    ready = live_ready + backfill_ready
    return {
        "time": now,
        "jobs": await store.counts(),
        # Retries wait in the queue too, scheduled for later: "ready" is what a worker could take now.
        "queue": {"depth": live + backfill, "live": live, "backfill": backfill, "ready": ready,
                  "later": live + backfill - ready,
                  "oldest_queued_seconds": round(now - oldest[0][1], 3) if oldest else None,
                  "shards": by_shard},
        "jobs_per_minute": per_minute[0],  # received
        "jobs_per_minute_history": per_minute[::-1],  # oldest minute first, the current one last
        "jobs_finished_last_minute": sum(history["jobs"][-2:]) if history["jobs"] else 0,
        "history": {"minute_starts": [60 * m for m in range(this_minute - HOUR + 1, this_minute + 1)], **history},
        "portals": await _portals(redis, rules, now, _requests_per_portal(counters)),
        "workers": await _workers(redis, now),
    }


async def _read_in_one_trip(redis: Redis, now: float, shards: int) -> list[Any]:
    """Each shard's queues (all, and due now), the oldest queued job, jobs received in each of the last
    MINUTES, the last HOUR's counts by minute, and the counters: one pipeline."""
    this_minute = int(now // 60)
    async with redis.pipeline(transaction=False) as pipe:
        for shard in range(shards):
            for queue in (live_queue(shard), backfill_queue(shard)):
                pipe.zcard(prefixed(queue))
                pipe.zcount(prefixed(queue), "-inf", now * 1000)
        pipe.zrange(prefixed(f"{INDEX_PREFIX}state:queued"), 0, 0, withscores=True)
        for minute in range(MINUTES):
            pipe.zcount(prefixed(JOB_INDEX), now - 60 * (minute + 1), f"({now - 60 * minute}")
        for minute in range(this_minute - HOUR + 1, this_minute + 1):
            pipe.hgetall(prefixed(f"{MINUTES_KEY}{minute}"))
        pipe.hgetall(prefixed(COUNTERS))
        return list(await pipe.execute())


async def _workers(redis: Redis, now: float) -> dict[str, Any]:
    """The worker processes online (each beats every few seconds), the jobs they have under way, and when
    a worker was last seen: how long ago, by Redis's clock, so a browser's clock does not matter."""
    queues = {prefixed(live_queue(0)): "live", prefixed(backfill_queue(0)): "backfill"}
    queues |= {prefixed(queue(k)): f"{kind} (shard {k})" for k in range(1, shard_count())
               for kind, queue in (("live", live_queue), ("backfill", backfill_queue))}
    beats = await heartbeat.online(redis)
    online = [w for w in beats if w["online"]]
    last_seen = max((w["seen_at"] for w in beats), default=None)
    processes: dict[str, dict[str, Any]] = {}
    for worker in online:
        process = processes.setdefault(f"{worker['host']}:{worker['pid']}", {
            "host": worker["host"], "pid": worker["pid"], "queues": [], "running": 0, "capacity": 0,
            "started_at": worker["started_at"], "seen_seconds_ago": round(max(0.0, now - worker["seen_at"]), 1)})
        process["queues"].append(queues.get(worker["queue"], worker["queue"]))
        process["running"] += worker["running"]
        process["capacity"] += worker["capacity"]
    return {"online": len(processes), "running": sum(p["running"] for p in processes.values()),
            "last_seen": last_seen,
            "last_seen_seconds_ago": round(max(0.0, now - last_seen), 1) if last_seen is not None else None,
            "processes": list(processes.values())}


def _requests_per_portal(counters: dict[bytes, bytes]) -> dict[str, dict[str, int]]:
    """REST calls counted by the workers (metrics), per portal: all of them and the refused ones."""
    totals: dict[str, dict[str, int]] = {}
    for raw_field, value in counters.items():
        name, labels = parse_field(raw_field.decode())
        if name == "rest_requests" and labels.get("via") == "request":
            entry = totals.setdefault(labels.get("portal", "-"), {"requests": 0, "errors": 0, "refused": 0,
                                                                   "unreachable": 0})
            outcome, count = labels.get("outcome"), int(value)
            entry["requests"] += count
            entry["errors"] += count if outcome != "ok" else 0
            # The portal answered with an error code, or could not be reached at all: two different troubles.
            entry["unreachable" if outcome == "NETWORK_ERROR" else "refused"] += count if outcome != "ok" else 0
    return totals


async def _portals(redis: Redis, rules: RuleSet, now: float,
                   requests: dict[str, dict[str, int]]) -> dict[str, dict[str, Any]]:
    """Each portal's request budget: the shared leaky bucket's free slots right now."""
    async with redis.pipeline(transaction=False) as pipe:
        for name in rules.portals:
            pipe.hmget(prefixed(f"b24:rate:{name}"), ["level", "ts"])
            pipe.exists(prefixed(f"b24:rate:{name}:slow"))
            pipe.hmget(prefixed(REACHABILITY + name), ["answered_at", "unreachable_at"])
        answers = await pipe.execute()
    portals = {}
    for i, (name, portal) in enumerate(rules.portals.items()):
        (level, ts), slow = answers[3 * i], bool(answers[3 * i + 1])
        rate = portal.rate_limit.per_second / (2 if slow else 1)
        used = max(0.0, float(level or 0) - (now - float(ts or now)) * rate)
        burst = portal.rate_limit.burst
        portals[name] = {"domain": portal.domain, "pages": record_pages(portal), "per_second": rate, "burst": burst, "slowed_down": slow,
                         "headroom": round(burst - used, 2), "headroom_ratio": round((burst - used) / burst, 3),
                         "reachability": reachability_of(*answers[3 * i + 2]),
                         **requests.get(name, {"requests": 0, "errors": 0, "refused": 0, "unreachable": 0})}
    return portals


def reachability_of(answered: bytes | None, unreachable: bytes | None) -> dict[str, Any]:
    """Whether the portal answered the workers' last requests (`at`: when that was seen), or not asked yet."""
    answered_at = float(answered) if answered else None
    unreachable_at = float(unreachable) if unreachable else None
    if unreachable_at is not None and (answered_at is None or unreachable_at > answered_at):
        return {"state": "unreachable", "at": unreachable_at, "last_answer": answered_at}
    if answered_at is not None:
        return {"state": "reachable", "at": answered_at, "last_answer": answered_at}
    return {"state": "unknown", "at": None, "last_answer": None}


def record_pages(portal: PortalConfig) -> str:
    """Where the portal's record pages are (`<pages>/crm/lead/details/42/`): the portal's own site, or for
    a portal on loopback (the demo portal, a fake of our own) that server, which serves the same paths.
    Only the origin of the webhook URL: its path holds the webhook's secret code."""
    url = urlsplit(portal.rest_url.get_secret_value()) if portal.rest_url else None
    if url is not None and url.hostname and _loopback(url.hostname):
        return f"{url.scheme}://{url.netloc.rsplit('@', 1)[-1]}"
    return f"https://{portal.domain}"


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost" or host.endswith(".localhost")
