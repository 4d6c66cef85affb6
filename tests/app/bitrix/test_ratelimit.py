"""RateLimiter on a real Redis: one leaky bucket per portal, shared by every process."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from arq.connections import ArqRedis
from redis.asyncio import Redis

from app.bitrix.ratelimit import SLOW_DOWN_SECONDS, RateLimiter
from tests.support.waiting import until


@pytest.fixture
async def second_connection(redis_url: str, redis: ArqRedis) -> AsyncIterator[Redis]:
    """A second Redis connection, as another worker process has (the `redis` fixture flushed the db)."""
    other = Redis.from_url(redis_url)
    yield other
    await other.aclose()


async def test_burst_is_immediate_and_the_next_acquire_waits(redis: ArqRedis) -> None:
    limiter = RateLimiter(redis, headroom=0)

    for _ in range(5):
        await limiter.acquire("acme", 20.0, 5)
    assert limiter.stats.waits == 0
    assert limiter.stats.waited_seconds == 0

    await limiter.acquire("acme", 20.0, 5)
    assert limiter.stats.waits >= 1
    assert limiter.stats.waited_seconds > 0


async def test_two_limiters_share_one_budget(redis: ArqRedis, second_connection: Redis) -> None:
    """15 acquisitions from two 'processes' at 20/s with a burst of 5 need at least (15 - 5) / 20 s."""
    first, second = RateLimiter(redis, headroom=0), RateLimiter(second_connection, headroom=0)

    started = time.monotonic()
    await asyncio.gather(*[first.acquire("acme", 20.0, 5) for _ in range(8)],
                         *[second.acquire("acme", 20.0, 5) for _ in range(7)])
    elapsed = time.monotonic() - started

    # If each instance had its own bucket, 10 + 5 slots would be free at once and this would take ~0.25 s.
    assert elapsed >= 0.4
    assert elapsed < 10  # and it does finish
    assert first.stats.waits > 0 and second.stats.waits > 0


async def test_one_limiter_alone_would_not_have_to_wait_for_its_own_share(redis: ArqRedis,
                                                                         second_connection: Redis) -> None:
    """The waits of the second limiter come from the first one's use of the bucket."""
    first, second = RateLimiter(redis, headroom=0), RateLimiter(second_connection, headroom=0)

    for _ in range(5):
        await first.acquire("acme", 2.0, 5)
    assert first.stats.waits == 0

    task = asyncio.create_task(second.acquire("acme", 2.0, 5))
    await until(lambda: second.stats.waits == 1, 10, "the second limiter to wait")  # the bucket is full for everyone
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_the_bucket_drains_over_time(redis: ArqRedis) -> None:
    limiter = RateLimiter(redis, headroom=0)
    for _ in range(3):
        await limiter.acquire("acme", 20.0, 3)
    assert limiter.stats.waits == 0

    await asyncio.sleep(0.12)  # two slots drain at 20/s
    await limiter.acquire("acme", 20.0, 3)
    await limiter.acquire("acme", 20.0, 3)
    assert limiter.stats.waits == 0


async def test_after_slow_down_the_next_acquire_waits_longer(redis: ArqRedis) -> None:
    limiter = RateLimiter(redis, headroom=0)
    await limiter.acquire("acme", 20.0, 5)
    assert limiter.stats.waits == 0

    await limiter.slow_down("acme", 5)
    await limiter.acquire("acme", 20.0, 5)

    assert limiter.stats.waits > 0
    # The bucket is full and the rate halved: one slot takes about 1 / 10 s, not 1 / 20 s.
    assert limiter.stats.waited_seconds > 0.075
    slow_ttl = await redis.ttl("b24:rate:acme:slow")
    assert 0 < slow_ttl <= SLOW_DOWN_SECONDS


async def test_slow_down_is_seen_by_another_process(redis: ArqRedis, second_connection: Redis) -> None:
    refused, other = RateLimiter(redis, headroom=0), RateLimiter(second_connection, headroom=0)

    await refused.slow_down("acme", 5)
    await other.acquire("acme", 20.0, 5)

    assert other.stats.waits > 0


async def test_portals_have_separate_buckets(redis: ArqRedis) -> None:
    limiter = RateLimiter(redis, headroom=0)
    for _ in range(3):
        await limiter.acquire("acme", 1.0, 3)
    await limiter.slow_down("acme", 3)

    for _ in range(3):
        await limiter.acquire("globex", 1.0, 3)
    assert limiter.stats.waits == 0

    task = asyncio.create_task(limiter.acquire("acme", 1.0, 3))
    await until(lambda: limiter.stats.waits == 1, 10, "acme's full bucket to make it wait")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_prefixes_keep_installations_apart(redis: ArqRedis) -> None:
    one, two = RateLimiter(redis, prefix="one", headroom=0), RateLimiter(redis, prefix="two", headroom=0)
    for _ in range(2):
        await one.acquire("acme", 1.0, 2)
    for _ in range(2):
        await two.acquire("acme", 1.0, 2)

    assert one.stats.waits == 0 and two.stats.waits == 0


async def test_a_bucket_stamped_later_than_now_is_not_fuller_for_it(redis: ArqRedis) -> None:
    # Lua's tostring kept 0.1 ms of a Unix time: a stamp rounded up made the next call's elapsed
    # time negative, the bucket fuller than it was, and a caller within the burst waited.
    seconds, micros = await redis.time()
    await redis.hset("b24:rate:acme", mapping={"level": "1", "ts": f"{seconds + micros / 1e6 + 1:.6f}"})
    limiter = RateLimiter(redis, headroom=0)

    await limiter.acquire("acme", 1.0, 2)

    assert limiter.stats.waits == 0
    assert await level(redis) == pytest.approx(2.0)
    stamp = (await redis.hget("b24:rate:acme", "ts")).decode()
    assert len(stamp.split(".")[1]) == 6  # kept to the microsecond


async def test_bucket_keys_expire(redis: ArqRedis) -> None:
    limiter = RateLimiter(redis, headroom=0)
    await limiter.acquire("acme", 2.0, 50)

    ttl = await redis.ttl("b24:rate:acme")
    assert 0 < ttl <= 25 + 60  # burst / rate + 60 s: idle portals leave nothing behind


async def test_by_default_two_slots_stay_free_for_network_jitter(redis: ArqRedis) -> None:
    limiter = RateLimiter(redis)

    for _ in range(3):
        await limiter.acquire("acme", 20.0, 5)
    assert limiter.stats.waits == 0
    await limiter.acquire("acme", 20.0, 5)
    assert limiter.stats.waits >= 1


async def level(redis: Redis, portal: str = "acme") -> float:
    return float(await redis.hget(f"b24:rate:{portal}", "level") or 0)


async def test_each_slot_is_taken_when_it_is_used(redis: ArqRedis) -> None:
    """At 2 requests a second a slot taken ahead and left unused would cost half a second."""
    limiter = RateLimiter(redis, headroom=0)

    for expected in (1, 2, 3):
        await limiter.acquire("acme", 2.0, 50)
        assert await level(redis) == pytest.approx(expected, abs=0.05)
