"""Prometheus metrics at /metrics, counted in Redis so that every web and worker process adds to one set.

Workers and web processes come and go; counting in Redis keeps one answer for the installation,
so Prometheus scrapes any one web process. Gauges (jobs by state, queue depth) are read at scrape time.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.api.keys import outage_key, redis_key, store_key
from app.store.counters import COUNTERS, DURATION_BUCKETS, field, parse_field, stage_counts
from app.store.namespace import prefixed
from app.store.queue import backfill_queue, live_queue, shard_count

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


FLUSH_EVERY = 1.0  # seconds; intake is the hot path, so event counts reach Redis in batches
# Each accepted event is a job record, not a log line (a log line cost a fifth of intake's capacity,
# see docs/benchmarks.md); the log gets what intake did once a minute instead.
SUMMARY_EVERY = 60.0


class EventCounts:
    """Events answered, counted in memory and added to the shared counters about once a second."""

    def __init__(self) -> None:
        self.pending: Counter[str] = Counter()
        self._unsummarized: Counter[str] = Counter()
        self._summarized_at = time.monotonic()

    async def flush(self, redis: Redis) -> None:
        counts, self.pending = self.pending, Counter()
        self._unsummarized.update(counts)
        if time.monotonic() - self._summarized_at >= SUMMARY_EVERY:
            self.log_summary()
        if not counts:
            return
        try:
            async with redis.pipeline(transaction=False) as pipe:
                stage_counts(pipe, counts)
                await pipe.execute()
        except (RedisError, OSError):
            self.pending.update(counts)  # Redis is away: keep them for the next flush

    def log_summary(self) -> None:
        """One line for the events answered since the last: by outcome, and by portal."""
        now = time.monotonic()
        seconds, self._summarized_at = now - self._summarized_at, now
        counts, self._unsummarized = self._unsummarized, Counter()
        if not counts:
            return
        outcomes: Counter[str] = Counter()
        portals: Counter[str] = Counter()
        for raw_field, count in counts.items():
            labels = parse_field(raw_field)[1]
            outcomes[labels["outcome"]] += count
            if labels["portal"] != "-":
                portals[labels["portal"]] += count
        log.info("events in the last %.0f s: %s; by portal: %s (each accepted one is a job record: "
                 "/api/jobs, the dashboard)", seconds, _listed(outcomes), _listed(portals) or "none")

    async def flush_forever(self, redis: Redis) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            await self.flush(redis)


event_counts_key = web.AppKey("event_counts", EventCounts)


@web.middleware
async def count_events(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count each event the portal endpoint answers, by portal, event and outcome."""
    response = await handler(request)
    if request.path == "/bitrix/events":
        portal, event, outcome = _event_labels(request, response.status)
        request.app[event_counts_key].pending[_event_field(portal, event, outcome)] += 1
    return response


@functools.lru_cache(maxsize=4096)  # labels come only from authenticated events: a few per portal
def _event_field(portal: str, event: str, outcome: str) -> str:
    return field("events_received", portal=portal, event=event, outcome=outcome)


def _listed(counts: Counter[str]) -> str:
    return ", ".join(f"{count} {name}" for name, count in counts.most_common())


async def event_counts_context(app: web.Application) -> AsyncIterator[None]:
    counts = app[event_counts_key] = EventCounts()
    flusher = asyncio.create_task(counts.flush_forever(app[redis_key]))
    yield
    flusher.cancel()
    await counts.flush(app[redis_key])
    counts.log_summary()


# Set by the webhook: (portal, event, outcome), outcome one of queued, duplicate, spooled, ignored or
# installed. Read only when the answer is a 200.
EVENT_LABELS = web.RequestKey[tuple[str, str, str]]("event_labels", tuple)


def _event_labels(request: web.Request, status: int) -> tuple[str, str, str]:
    if status == 200 and EVENT_LABELS in request:
        return request[EVENT_LABELS]
    # Unauthenticated bodies never become labels: anyone could invent portals and events.
    return "-", "-", {401: "refused", 403: "refused", 503: "unavailable"}.get(status, "malformed")


class _Snapshot(Collector):
    """The metrics as read from Redis for one scrape."""

    def __init__(self, counters: dict[str, float], states: dict[str, int], queues: dict[str, int],
                 oldest_queued: float) -> None:
        self.counters, self.states, self.queues, self.oldest_queued = counters, states, queues, oldest_queued

    def collect(self) -> Iterator[Metric]:
        yield self._counter("events_received", "Events the portal endpoint answered, by outcome.",
                            ["portal", "event", "outcome"])
        yield self._counter("rest_requests", "Portal REST requests (via=request) and the commands inside "
                            "batches (via=batch), by method and outcome.", ["portal", "method", "outcome", "via"])
        yield self._counter("rate_limit_wait_seconds", "Seconds workers waited for the portal's request limit.",
                            ["portal"])
        yield self._counter("spool_quarantined", "Spooled events that could not become jobs, moved to the "
                            "spool's quarantine.jsonl for a person to look at.", [])
        yield self._durations()
        jobs = GaugeMetricFamily("b24rebind_jobs", "Job records kept, by state.", labels=["state"])
        for state, count in self.states.items():
            jobs.add_metric([state], count)
        yield jobs
        depth = GaugeMetricFamily("b24rebind_queue_depth", "Jobs waiting on the arq queues.", labels=["queue"])
        for queue, count in self.queues.items():
            depth.add_metric([queue], count)
        yield depth
        yield GaugeMetricFamily("b24rebind_oldest_queued_seconds", "Age of the oldest queued job.",
                                value=self.oldest_queued)

    def _counter(self, name: str, documentation: str, labels: list[str]) -> CounterMetricFamily:
        family = CounterMetricFamily(f"b24rebind_{name}", documentation, labels=labels)
        for raw_field, value in self.counters.items():
            metric, values = parse_field(raw_field)
            if metric == name:
                family.add_metric([values.get(label, "") for label in labels], value)
        return family

    def _durations(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily("b24rebind_job_duration_seconds", "Time from a job's start to its end.",
                                       labels=["state"])
        per_state: dict[str, Counter[str]] = {}
        for raw_field, value in self.counters.items():
            metric, values = parse_field(raw_field)
            if metric == "job_duration_seconds_bucket":
                per_state.setdefault(values["state"], Counter())[values["le"]] += int(value)
        for state, counts in sorted(per_state.items()):
            total, buckets = 0, []
            for bound in [*(str(b) for b in DURATION_BUCKETS), "+Inf"]:
                total += counts[bound]
                buckets.append((bound, total))
            family.add_metric([state], buckets, self.counters.get(field("job_duration_seconds_sum", state=state), 0))
        return family


async def snapshot(redis: Redis, states: dict[str, int]) -> _Snapshot:
    """Read what a scrape shows from Redis."""
    shards = range(shard_count())  # every shard's queues, summed: a portal's jobs wait on its shard's
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(prefixed(COUNTERS))
        pipe.zrange(prefixed("b24:jobs:state:queued"), 0, 0, withscores=True)
        for shard in shards:
            pipe.zcard(prefixed(live_queue(shard)))
            pipe.zcard(prefixed(backfill_queue(shard)))
        raw, oldest, *depths = await pipe.execute()
    counters = {key.decode(): float(value) for key, value in raw.items()}
    age = max(0.0, time.time() - oldest[0][1]) if oldest else 0.0
    return _Snapshot(counters, states, {"live": sum(depths[0::2]), "backfill": sum(depths[1::2])}, age)


class _RedisState(Collector):
    """Whether this web process reaches Redis: answered even while Redis is away, so that an alert can
    say "Redis is away" instead of only "the scrape failed"."""

    def __init__(self, down_for: float | None) -> None:
        self.down_for = down_for

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("b24rebind_redis_up", "1 when the web process reaches Redis, 0 while it is away.",
                                value=0 if self.down_for is not None else 1)
        yield GaugeMetricFamily("b24rebind_redis_down_seconds", "How long Redis has been away (0 while it answers).",
                                value=self.down_for or 0.0)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """GET /metrics: the Prometheus text format; while Redis is away, only b24rebind_redis_up (0)."""
    registry = CollectorRegistry(auto_describe=False)
    outage = request.app[outage_key]
    try:
        await request.app[event_counts_key].flush(request.app[redis_key])  # this process's latest counts too
        registry.register(await snapshot(request.app[redis_key], await request.app[store_key].counts()))
        outage.up()
    except (RedisError, OSError) as exc:
        outage.down(exc)
    registry.register(_RedisState(outage.down_for))
    response = web.Response(body=generate_latest(registry))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def setup_metrics(app: web.Application) -> None:
    app.middlewares.append(count_events)
    app.cleanup_ctx.append(event_counts_context)
    app.router.add_get("/metrics", metrics_endpoint)
