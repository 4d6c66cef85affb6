"""One request budget per portal, kept in Redis so every process of an installation shares it.

A portal allows about 2 requests a second with a burst of 50, counted per portal and source
address (official docs, GitHub bitrix24/b24restdocs: settings/performance/limits.md). The bucket here mirrors the portal's own leaky bucket,
so callers wait before the portal would refuse them.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from redis.asyncio import Redis

from app.store.namespace import prefixed

# Times are kept to the microsecond: Lua's tostring keeps 14 digits, 0.1 ms of a Unix time, and a
# time rounded up made the next call's elapsed time negative and the bucket fuller than it was.
# Returns the seconds to wait (as a string: Lua numbers become integers on the way out), the slots
# taken (one, or none while the caller must wait) and the bucket's level. While a portal has recently
# refused us, the drain rate is halved.
_LEAKY_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2]) - tonumber(ARGV[3] or '0')
if redis.call('EXISTS', KEYS[2]) == 1 then rate = rate / 2 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local level = tonumber(redis.call('HGET', KEYS[1], 'level') or '0')
local since = tonumber(redis.call('HGET', KEYS[1], 'ts') or tostring(now))
level = math.max(0, level - math.max(0, now - since) * rate)
local wait, taken = 0, 0
if level + 1 <= burst then
  taken = 1
  level = level + 1
else
  wait = (level + 1 - burst) / rate
end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'ts', string.format('%.6f', now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
return {tostring(wait), taken, tostring(level)}
"""

_FILL_BUCKET = """
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'level', ARGV[1], 'ts', t[1] .. '.' .. string.format('%06d', tonumber(t[2])))
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
return 1
"""

SLOW_DOWN_SECONDS = 60
# Requests reach the portal a little sooner or later than they leave the bucket here; keeping two
# slots free absorbs that jitter, so running at the limit never becomes QUERY_LIMIT_EXCEEDED.
HEADROOM = 2


@dataclass
class RateLimitStats:
    waits: int = 0
    waited_seconds: float = 0.0


class RateLimiter:
    """A leaky bucket per portal, shared through Redis; `acquire` waits for a free slot."""

    def __init__(self, redis: Redis, *, prefix: str = "b24:rate", headroom: int = HEADROOM) -> None:
        self._redis = redis
        self._headroom = headroom
        self._prefix = prefixed(prefix)
        self._script = redis.register_script(_LEAKY_BUCKET)
        self._fill = redis.register_script(_FILL_BUCKET)
        self.stats = RateLimitStats()
        self.levels: dict[str, float] = {}  # each portal's bucket as last seen: how busy the portal is

    async def acquire(self, portal: str, per_second: float, burst: int, reserve: int = 0) -> None:
        """Wait for a slot. `reserve` slots of the burst are left to others (backfill leaves half to live events)."""
        # A slot is only taken when the wait is zero, so a waiting caller asks again after sleeping.
        while (wait := await self.try_take(portal, per_second, burst, reserve)) > 0:
            await asyncio.sleep(wait)

    async def try_take(self, portal: str, per_second: float, burst: int, reserve: int = 0) -> float:
        """Take a slot if one is free (returns 0), else the seconds until one will be (nothing taken)."""
        reserved = min(burst - 1, reserve + self._headroom)
        keys = [f"{self._prefix}:{portal}", f"{self._prefix}:{portal}:slow"]
        wait_text, _, level = await self._script(keys=keys, args=[per_second, burst, reserved])
        self.levels[portal] = float(level)
        wait = float(wait_text)
        if wait <= 0:
            return 0.0
        self.stats.waits += 1
        self.stats.waited_seconds += wait
        return wait

    async def slow_down(self, portal: str, burst: int) -> None:
        """The portal refused a request: treat the bucket as full and halve the rate for a while."""
        keys = [f"{self._prefix}:{portal}", f"{self._prefix}:{portal}:slow"]
        await self._fill(keys=keys, args=[burst, SLOW_DOWN_SECONDS])


class LocalRateLimiter:
    """The same leaky bucket in this process only: for one-off commands that run without Redis."""

    def __init__(self) -> None:
        self._level: dict[str, tuple[float, float]] = {}
        self.stats = RateLimitStats()
        self.levels: dict[str, float] = {}

    async def acquire(self, portal: str, per_second: float, burst: int, reserve: int = 0) -> None:
        while (wait := await self.try_take(portal, per_second, burst, reserve)) > 0:
            await asyncio.sleep(wait)

    async def try_take(self, portal: str, per_second: float, burst: int, reserve: int = 0) -> float:
        level, since = self._level.get(portal, (0.0, time.monotonic()))
        now = time.monotonic()
        level = max(0.0, level - (now - since) * per_second)
        self.levels[portal] = level
        if level + 1 <= burst - reserve:
            self._level[portal] = (level + 1, now)
            return 0.0
        self._level[portal] = (level, now)
        wait = (level + 1 - burst + reserve) / per_second
        self.stats.waits += 1
        self.stats.waited_seconds += wait
        return wait

    async def slow_down(self, portal: str, burst: int) -> None:
        self._level[portal] = (float(burst), time.monotonic())
