"""One job at a time per lead: a conversion fires several events that all lead to the same work."""
from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from types import TracebackType

from redis.asyncio import Redis

from app.namespace import prefixed

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
    """Held while a job reads and changes one lead's activities; renewed while held, for at most `ttl`."""

    def __init__(self, redis: Redis, portal: str, lead_id: int | None, ttl: int) -> None:
        self._redis = redis
        self._key = prefixed(f"b24:lock:{portal}:lead:{lead_id}")
        self._lead_id = lead_id
        self._ttl = ttl
        self._token = secrets.token_hex(8)
        self._renewal: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LeadLock:
        lease = min(self._ttl, LEASE)
        if self._lead_id and not await self._redis.set(self._key, self._token, nx=True, px=int(lease * 1000)):
            raise Busy(f"another job is working on lead {self._lead_id}")
        if self._lead_id and self._ttl > LEASE:
            self._renewal = asyncio.create_task(self._renew(time.monotonic() + self._ttl))
        return self

    async def _renew(self, until: float) -> None:
        while time.monotonic() + LEASE / 3 < until:
            await asyncio.sleep(LEASE / 3)
            with contextlib.suppress(Exception):  # a missed renewal is retried at the next one
                await self._redis.eval(_RENEW, 1, self._key, self._token,
                                       int(min(LEASE, until - time.monotonic()) * 1000))

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
        if self._lead_id:
            await self._redis.eval(_RELEASE, 1, self._key, self._token)
