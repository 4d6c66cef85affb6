"""One job at a time per lead: a conversion fires several events that all lead to the same work.

The lock is redis-py's `Lock` (a key holding this job's token, set NX with an expiry, released and
extended by redis-py's own token-checking scripts). It lives LEASE seconds and is extended while the
job runs, so a killed worker's lead is free again soon; a job checks it still owns it before each of
its write calls (`still_held`, the session's guard), so a process paused past the lease (SIGSTOP, a
long GC, a VM freeze) sends none of its writes once another job may hold the lead.
"""
from __future__ import annotations

import asyncio
import contextlib
import time

from redis.asyncio import Redis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.store.namespace import prefixed

# A lock lives this many seconds unless its holder extends it: a killed worker's lead is free again soon.
LEASE = 15.0
CHECK_TIMEOUT = 2.0  # seconds for one Redis call of the lock (take, extend, check, release)


class Busy(Exception):
    """Another job is working on the same lead right now; this one waits and then finds little to do."""


class LeadLock:
    """Held while a job reads and changes one lead's activities; extended while held, for at most `ttl`."""

    def __init__(self, redis: Redis, portal: str, ttl: float, *, lease: float = LEASE) -> None:
        self._redis = redis
        self._portal = portal
        self._ttl = ttl
        self._lease = lease
        self._lock: Lock | None = None  # while held
        self._renewal: asyncio.Task[None] | None = None

    @property
    def held(self) -> bool:
        return self._lock is not None

    async def acquire(self, lead_id: int | None) -> None:
        """Raises Busy if another job holds the lead; a job with no lead holds nothing. Never waits."""
        if not lead_id:
            return
        lock = Lock(self._redis, prefixed(f"b24:lock:{self._portal}:lead:{lead_id}"),
                    timeout=min(self._ttl, self._lease), blocking=False, thread_local=False)
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                taken = await lock.acquire()
        except TimeoutError:  # said as Redis failing: the job runs again, its record says so
            raise RedisTimeoutError(f"Redis did not answer for the lead's lock within {CHECK_TIMEOUT:g} s") from None
        if not taken:
            raise Busy(f"another job is working on lead {lead_id}")
        self._lock = lock
        if self._ttl > self._lease:
            self._renewal = asyncio.create_task(self._extend(lock, time.monotonic() + self._ttl))

    async def still_held(self) -> bool:
        """True while this job owns the lead's lock (or needs none): asked before each write call."""
        if self._lock is None:
            return True
        async with asyncio.timeout(CHECK_TIMEOUT):
            return await self._lock.owned()

    async def _extend(self, lock: Lock, until: float) -> None:
        while time.monotonic() + self._lease / 3 < until:
            await asyncio.sleep(self._lease / 3)
            try:
                async with asyncio.timeout(CHECK_TIMEOUT):
                    await lock.reacquire()  # back to a full lease, only if the token is still ours
            except LockError:
                return  # lapsed (the process was paused past it): `still_held` says so before any write
            except (RedisError, OSError, TimeoutError):
                continue  # a missed extension is tried again at the next one

    async def release(self) -> None:
        """Lets go of the lead; a lock that lapsed meanwhile is left to whoever holds it now."""
        if self._renewal is not None:
            self._renewal.cancel()
        lock, self._lock = self._lock, None
        if lock is None:
            return
        with contextlib.suppress(LockError, RedisError, OSError, TimeoutError):  # it ends within its lease anyway
            async with asyncio.timeout(CHECK_TIMEOUT):
                await lock.release()
