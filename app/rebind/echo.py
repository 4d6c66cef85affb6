"""Loop safety: recognise the echo of our own change, and stop rules that flip an activity back and forth.

Every binding write (crm.activity.binding.add/delete/move goes through CCrmActivity::Update) fires
ONCRMACTIVITYUPDATE back at the service, about two events for each activity re-bound. The service knows
what it writes, so the echo costs little:

- while a job writes an activity (`around`), and for ECHO_GRACE seconds after (the portal's queue sends
  within seconds), an update event for it is the echo of those writes: it is answered with no read at
  all (the job leaves the activity as its plan says). The price: a person's change to that very
  activity within those seconds is taken for an echo too (its job says so, skipped);
- after that, a fingerprint of each activity's new bindings is kept for a few minutes; an update event
  that finds exactly that state costs one read and writes nothing. The portal stamps an event with its
  second, and a delivery seen before is queued once, so one activity's echoes of one second are one job.

Independently, every change the service makes to an activity is counted for an hour: rules that keep
changing one activity are stopped.
"""
from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol, TypeVar

from redis.asyncio import Redis

from app.rules.facts import Activity, Binding
from app.rules.plan import BindingPlan
from app.store.namespace import prefixed

ECHO_SECONDS = 300  # the portal's event queue delivers within seconds; minutes is a generous margin
# How long an activity counts as being written if its job never says it is done (a killed worker): an
# update meanwhile is taken for an echo, and its job runs again within seconds anyway.
WRITING_SECONDS = 120
ECHO_GRACE = 10  # seconds after the writes during which an update is taken for their echo unread
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


class Written(Protocol):
    """What `around` needs of an executor's outcome (app.rebind.executor.Outcome)."""

    kind: str
    id: int
    after: list[Binding]
    status: str


W = TypeVar("W", bound=Written)


class ChangeLog:
    """What the service just did to each activity, kept briefly in Redis."""

    def __init__(self, redis: Redis, portal: str) -> None:
        self._redis = redis
        self._portal = portal

    async def is_echo(self, activity: Activity) -> bool:
        [stored] = await self._redis.mget([self._key("applied", activity.id)])
        return stored is not None and stored.decode() == fingerprint(activity.bindings)

    async def being_written(self, activity_id: int) -> bool:
        """Whether a job is writing this activity, or did within ECHO_GRACE: an update event is its echo."""
        return bool(await self._redis.exists(self._key("writing", activity_id)))

    async def around(self, plan: BindingPlan, writes: Awaitable[list[W]]) -> list[W]:
        """Carry out `writes` (the executor's, of `plan`) with the activities marked as being written, then
        leave each changed one's fingerprint and take the marks away, in one round trip each side, so no
        echo of these writes finds the activity neither marked nor fingerprinted."""
        activity_ids = [a.activity_id for a in plan.activities if a.changes and not a.dry_run]
        if activity_ids:
            async with self._redis.pipeline(transaction=False) as pipe:
                for activity_id in activity_ids:
                    pipe.set(self._key("writing", activity_id), 1, ex=WRITING_SECONDS)
                await pipe.execute()
        outcomes: list[W] = []
        try:
            outcomes = await writes
            return outcomes
        finally:
            if activity_ids:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for outcome in outcomes:
                        if outcome.kind == "activity" and outcome.status == "changed":
                            pipe.set(self._key("applied", outcome.id), fingerprint(outcome.after), ex=ECHO_SECONDS)
                    for activity_id in activity_ids:  # the echoes of the last writes are still on their way
                        pipe.set(self._key("writing", activity_id), 1, ex=ECHO_GRACE)
                    await pipe.execute()

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
