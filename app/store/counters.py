"""The shared counters behind /metrics, in Redis, so that every web and worker process adds to one set.

What is staged here needs only Redis: the counters' hash, the per-minute counts the dashboard's chart
reads, and when each portal last answered. The API reads them (`app/api/metrics.py`, `app/api/stats.py`);
intake and the workers add to them.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from app.store.namespace import prefixed

COUNTERS = "b24:metrics"  # hash: "name|label=value|..." -> count or sum
DURATION_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)  # a job's, in seconds


def field(name: str, **labels: object) -> str:
    # Label values come from rules files and portals: keep them from breaking the field's syntax.
    return name + "".join(f"|{key}={str(value).replace('|', '/').replace('=', '-')}" for key, value in labels.items())


def parse_field(raw_field: str) -> tuple[str, dict[str, str]]:
    name, *pairs = raw_field.split("|")
    return name, dict(pair.split("=", 1) for pair in pairs)


MINUTES = "b24:minute:"  # + Unix minute -> hash: events, jobs (finished), requests (to portals) in that minute
KEEP_MINUTES = 7200  # seconds: the dashboard's chart shows the last hour

# Adds to many counters in one command: ARGV holds field, increment pairs (HINCRBYFLOAT keeps whole
# numbers whole, so counts stay integers), then the seconds a minute's counts are kept. Three of them
# are also counted per minute, for the chart:
# events received, jobs finished (each adds one to exactly one duration bucket) and requests sent.
_ADD = """
local minute = false
for i = 1, #ARGV - 1, 2 do
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
  local name = string.match(ARGV[i], '^[^|]+')
  local series = nil
  if name == 'events_received' then series = 'events'
  elseif name == 'job_duration_seconds_bucket' then series = 'jobs'
  elseif name == 'rest_requests' and string.find(ARGV[i], '|via=request', 1, true) then series = 'requests' end
  if series then
    redis.call('HINCRBYFLOAT', KEYS[2], series, ARGV[i + 1])
    minute = true
  end
end
if minute then redis.call('EXPIRE', KEYS[2], ARGV[#ARGV]) end
return 1
"""


def stage_counts(pipe: Any, counts: Mapping[str, float]) -> None:
    """Add counts to the shared counters as part of a pipeline: one command whatever their number."""
    if counts:
        pairs = [part for name, n in counts.items() for part in (name, repr(n))]
        minute = prefixed(f"{MINUTES}{int(time.time() // 60)}")
        pipe.eval(_ADD, 2, prefixed(COUNTERS), minute, *pairs, KEEP_MINUTES)


REACHABILITY = "b24:reach:"  # + portal -> hash: answered_at, unreachable_at (Unix seconds)


def stage_reachability(pipe: Any, portal: str, outcomes: set[str]) -> None:
    """When the portal last answered (anything, even an error) and when it last could not be reached."""
    now, seen = time.time(), {}
    if outcomes - {"NETWORK_ERROR"}:
        seen["answered_at"] = now
    if "NETWORK_ERROR" in outcomes:
        seen["unreachable_at"] = now - 0.001 if "answered_at" in seen else now  # a retry that got through wins
    if seen:
        pipe.hset(prefixed(REACHABILITY + portal), mapping=seen)
