"""One job at a time per lead: a conversion fires several events that all lead to the same work."""
from __future__ import annotations

import asyncio
import contextlib
import secrets
import time

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from app.store.namespace import prefixed
from app.store.replies import awaited

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# A lock lives this many seconds unless its holder renews it: a killed worker's lead is free again soon.
LEASE = 15.0


class Busy(Exception):
    """Another job is working on the same lead right now; this one waits and then finds little to do."""


class LeadLock:
    """Held while a job reads and changes one lead's activities; renewed while held, for at most `ttl`.

    A job lets go of it in its last pipeline (`stage_release`), with its record: one round trip less a
    job, and the next job on the lead finds the record of this one saved.
    """

    def __init__(self, redis: Redis, portal: str, ttl: int) -> None:
        self._redis = redis
        self._portal = portal
        self._ttl = ttl
        self._token = secrets.token_hex(8)
        self._key: str | None = None  # while held
        self._renewal: asyncio.Task[None] | None = None

    async def acquire(self, lead_id: int | None) -> None:
        """Raises Busy if another job holds the lead; a job with no lead holds nothing."""
        if not lead_id:
            return
        key = prefixed(f"b24:lock:{self._portal}:lead:{lead_id}")
        if not await self._redis.set(key, self._token, nx=True, px=int(min(self._ttl, LEASE) * 1000)):
            raise Busy(f"another job is working on lead {lead_id}")
        self._key = key
        if self._ttl > LEASE:
            self._renewal = asyncio.create_task(self._renew(key, time.monotonic() + self._ttl))

    async def _renew(self, key: str, until: float) -> None:
        while time.monotonic() + LEASE / 3 < until:
            await asyncio.sleep(LEASE / 3)
            with contextlib.suppress(Exception):  # a missed renewal is retried at the next one
                lease = min(LEASE, until - time.monotonic())
                await awaited(self._redis.eval(_RENEW, 1, key, self._token, str(int(lease * 1000))))

    def stage_release(self, pipe: Pipeline) -> None:
        """If the pipeline never reaches Redis, the lock still ends within LEASE: it is no longer renewed."""
        if self._renewal is not None:
            self._renewal.cancel()
        if self._key is not None:
            pipe.eval(_RELEASE, 1, self._key, self._token)
            self._key = None
