"""Portals split into shards: every enqueuer puts a portal's jobs on its shard's queues (a real Redis)."""
from __future__ import annotations

import time
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from arq.connections import ArqRedis
from arq.constants import job_key_prefix

from app.store.jobs import JobRecord, JobState, JobStore
from app.store.queue import (
    BACKFILL_QUEUE,
    LIVE_QUEUE,
    STRANDED_AFTER,
    JobQueue,
    backfill_queue,
    live_queue,
    queues_beyond,
    shard_of,
    use_shards,
)
from tests.conftest import post_event

SHARDS = 4
ACME = 2  # "acme" (the test portal): crc32 % 4


@pytest.fixture
def four_shards() -> Iterator[None]:
    use_shards(SHARDS)
    yield
    use_shards(1)


async def where(redis: ArqRedis, job_id: str) -> list[str]:
    """The queues (of every shard, live and backfill, and the unsharded names) that hold the job id."""
    names = {live_queue(k) for k in range(8)} | {backfill_queue(k) for k in range(8)}
    return sorted([name for name in names if await redis.zscore(name, job_id) is not None])


def test_a_portal_s_shard_is_a_stable_hash_of_its_name_not_python_s_salted_one() -> None:
    assert shard_of("acme", SHARDS) == zlib.crc32(b"acme") % SHARDS == ACME
    assert shard_of("acme", 1) == 0 and shard_of("anything") == 0  # one shard: today's queues
    assert {shard_of(f"portal{n}", SHARDS) for n in range(50)} == set(range(SHARDS))  # every shard gets some
    assert (live_queue(0), backfill_queue(0)) == (LIVE_QUEUE, BACKFILL_QUEUE)  # shard 0 keeps the names


async def test_the_intake_queues_an_event_on_its_portal_s_shard(four_shards: None, client: Any,
                                                                redis: ArqRedis) -> None:
    status, answer = await post_event(client, "ONCRMACTIVITYADD", 7)
    assert status == 200
    assert await where(redis, answer["job_id"]) == [live_queue(ACME)]


async def test_submit_retry_rescue_and_backfill_all_queue_on_the_portal_s_shard(four_shards: None,
                                                                                redis: ArqRedis) -> None:
    store = JobStore(redis, 3600)
    queue = JobQueue(redis, store)
    # submit: the intake, the spool's drain and the reconcile sweep queue through it
    live = JobRecord.for_event("acme", "ONCRMACTIVITYADD", 1, "1")
    assert await queue.submit(live)
    assert await where(redis, live.id) == [live_queue(ACME)]
    backfill = JobRecord.for_event("acme", "ONCRMLEADUPDATE", 2, "backfill").model_copy(update={"trigger": "backfill"})
    assert await queue.submit(backfill)
    assert await where(redis, backfill.id) == [backfill_queue(ACME)]
    other = JobRecord.for_event("beta", "ONCRMACTIVITYADD", 1, "1")  # crc32 % 4 == 3
    assert await queue.submit(other)
    assert await where(redis, other.id) == [live_queue(3)]

    # a person's retry (API, `jobs retry`) of a job that has ended
    retried = JobRecord.for_event("acme", "ONCRMACTIVITYADD", 3, "1")
    retried.state = JobState.FAILED
    assert await store.create(retried)
    assert await queue.requeue(retried)
    assert await where(redis, retried.id) == [live_queue(ACME)]

    # the minute's rescue of a record left waiting with no arq job behind it
    stranded = JobRecord.for_event("acme", "ONCRMACTIVITYADD", 4, "1")
    assert await store.create(stranded)
    assert await queue.requeue_stranded(now=time.time() + STRANDED_AFTER + 1) == [stranded.id]
    assert await where(redis, stranded.id) == [live_queue(ACME)]

    # the runner's queue_again (arq lost the job's data)
    await redis.delete(job_key_prefix + live.id)
    await redis.zrem(live_queue(ACME), live.id)
    assert await queue.queue_again(live, "arq had lost its job")
    assert await where(redis, live.id) == [live_queue(ACME)]


async def test_queues_left_beyond_a_lowered_shard_count_are_found_for_the_shard_that_serves_them_now(
        redis: ArqRedis) -> None:
    store = JobStore(redis, 3600)
    use_shards(SHARDS)
    try:
        for n, portal in enumerate(("beta", "acme")):  # shards 3 and 2 of 4
            assert await JobQueue(redis, store).submit(JobRecord.for_event(portal, "ONCRMACTIVITYADD", n, "1"))
        backfill = JobRecord.for_event("beta", "ONCRMLEADUPDATE", 9, "b").model_copy(update={"trigger": "backfill"})
        assert await JobQueue(redis, store).submit(backfill)
    finally:
        use_shards(1)

    # Two shards now: shard 3's queues belong to shard 1 (3 % 2), shard 2's to shard 0.
    assert await queues_beyond(redis, 2) == {1: sorted([live_queue(3), backfill_queue(3)]), 0: [live_queue(2)]}
    assert await queues_beyond(redis, 4) == {}  # nothing beyond the count it was queued with
    assert await queues_beyond(redis, 1) == {0: sorted([live_queue(3), backfill_queue(3), live_queue(2)])}


async def test_the_dashboard_s_stats_show_every_shard_s_queue_depth_and_their_sum(four_shards: None, client: Any,
                                                                                 redis: ArqRedis) -> None:
    queue = JobQueue(redis, JobStore(redis, 3600))
    for n, portal in enumerate(("acme", "acme", "beta")):  # shards 2, 2, 3
        assert await queue.submit(JobRecord.for_event(portal, "ONCRMACTIVITYADD", n, "1"))

    stats = (await (await client.get("/api/stats")).json())["queue"]

    assert stats["depth"] == stats["live"] == stats["ready"] == 3
    assert [(s["shard"], s["live"], s["backfill"]) for s in stats["shards"]] == [(0, 0, 0), (1, 0, 0), (2, 2, 0), (3, 1, 0)]


async def test_metrics_count_the_jobs_waiting_on_every_shard(four_shards: None, client: Any, redis: ArqRedis) -> None:
    queue = JobQueue(redis, JobStore(redis, 3600))
    for n, portal in enumerate(("acme", "beta", "beta")):  # shards 2, 3, 3
        assert await queue.submit(JobRecord.for_event(portal, "ONCRMACTIVITYADD", n, "1"))

    text = await (await client.get("/metrics")).text()

    assert 'b24rebind_queue_depth{queue="live"} 3.0' in text
