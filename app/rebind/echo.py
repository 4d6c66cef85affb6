"""Loop safety: recognise the echo of our own change, and stop rules that flip an activity back and forth.

A binding change fires ONCRMACTIVITYUPDATE back at the service. After applying a plan the worker
records a fingerprint of each activity's new bindings for a few minutes; an update event that finds
exactly that state costs one read and writes nothing. Independently, every change the service makes
to an activity is counted for an hour: rules that keep changing one activity are stopped.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from app.rules.facts import Activity, Binding
from app.store.namespace import prefixed

ECHO_SECONDS = 300  # the portal's event queue delivers within seconds; minutes is a generous margin
CHANGE_WINDOW_SECONDS = 3600
MAX_CHANGES_PER_WINDOW = 4  # a conversion changes an activity once or twice; more is a loop
# The new state's fingerprint, and one more change counted in the hour's window, whose expiry the
# first change sets (SET NX; INCR keeps it; EXPIRE NX would need Redis 7). One command in a job's
# last pipeline instead of three.
_RECORD = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('SET', KEYS[2], 0, 'EX', ARGV[3], 'NX')
return redis.call('INCR', KEYS[2])
"""


def fingerprint(bindings: Sequence[Binding]) -> str:
    text = ",".join(sorted(str(b) for b in bindings))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ChangeLog:
    """What the service just did to each activity, kept briefly in Redis."""

    def __init__(self, redis: Redis, portal: str) -> None:
        self._redis = redis
        self._portal = portal

    async def is_echo(self, activity: Activity) -> bool:
        [stored] = await self._redis.mget([self._key("applied", activity.id)])
        return stored is not None and stored.decode() == fingerprint(activity.bindings)

    def stage_record(self, pipe: Any, activity_id: int, after: Sequence[Binding]) -> None:
        """Record a change as part of a pipeline: a job's last writes reach Redis in one round trip."""
        pipe.eval(_RECORD, 2, self._key("applied", activity_id), self._key("changes", activity_id),
                  fingerprint(after), ECHO_SECONDS, CHANGE_WINDOW_SECONDS)

    async def looping(self, activity_ids: list[int]) -> set[int]:
        """The activities this service already changed too often in the last hour."""
        if not activity_ids:
            return set()
        counts = await self._redis.mget([self._key("changes", i) for i in activity_ids])
        return {i for i, count in zip(activity_ids, counts) if count and int(count) >= MAX_CHANGES_PER_WINDOW}

    def _key(self, what: str, activity_id: int) -> str:
        return prefixed(f"b24:{what}:{self._portal}:{activity_id}")
