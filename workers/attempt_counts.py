"""What one attempt of a job adds to the shared counters (`app/store/counters.py`): its REST calls, the
rate limiter's wait, when its portal last answered, and, if it ended the job, its duration."""
from __future__ import annotations

from collections import defaultdict
from typing import Any
from weakref import WeakKeyDictionary

from app.bitrix.client import RestClient
from app.bitrix.ratelimit import RateLimiter
from app.store.counters import DURATION_BUCKETS, field, stage_counts, stage_reachability
from app.store.jobs import FINAL_STATES, JobRecord

_flushed_waits: WeakKeyDictionary[RateLimiter, float] = WeakKeyDictionary()


def stage_attempt(pipe: Any, record: JobRecord, client: RestClient, limiter: RateLimiter) -> None:
    """Count one attempt of a job: its REST calls, the rate-limit wait since the last count, and if it
    ended the job, its duration."""
    counts: defaultdict[str, float] = defaultdict(float)  # requests, and seconds waited
    calls = client.take_calls()
    for (method, outcome, via), n in calls.items():
        counts[field("rest_requests", portal=record.portal, method=method, outcome=outcome, via=via)] += n
    waited = limiter.stats.waited_seconds - _flushed_waits.get(limiter, 0.0)
    _flushed_waits[limiter] = limiter.stats.waited_seconds
    if waited > 0:
        counts[field("rate_limit_wait_seconds", portal=record.portal)] += waited
    stage_reachability(pipe, record.portal, {outcome for (_, outcome, via) in calls if via == "request"})
    if record.state in FINAL_STATES and record.started_at and record.finished_at:
        seconds, state = record.finished_at - record.started_at, record.state.value
        bucket = next((str(b) for b in DURATION_BUCKETS if seconds <= b), "+Inf")
        counts[field("job_duration_seconds_bucket", state=state, le=bucket)] += 1
        counts[field("job_duration_seconds_sum", state=state)] += seconds
    stage_counts(pipe, counts)
