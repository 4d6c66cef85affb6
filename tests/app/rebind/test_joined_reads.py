"""JoinedReads against a real Redis: jobs resumed together read in one MGET, each gets its own values."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from app.fakeportal import LEAD, FakePortal
from app.rebind.echo import MAX_CHANGES_PER_WINDOW, ChangeLog
from app.rebind.joined_reads import JoinedReads
from tests.conftest import post_event, record_changes


async def test_reads_made_in_one_turn_of_the_loop_share_one_mget(redis: Any) -> None:
    await redis.mset({"b24test:a": "1", "b24test:b": "2", "b24test:c": "3"})
    reads = JoinedReads(redis)

    answers = await asyncio.gather(reads.get(["b24test:a"]), reads.get(["b24test:c", "b24test:missing"]),
                                   reads.get(["b24test:b", "b24test:a"]))

    assert answers == [[b"1"], [b"3", None], [b"2", b"1"]]
    assert reads.mgets == 1


async def test_a_read_made_later_goes_in_the_next_mget(redis: Any) -> None:
    await redis.set("b24test:a", "1")
    reads = JoinedReads(redis)

    assert await reads.get(["b24test:a"]) == [b"1"]
    await redis.set("b24test:a", "2")
    assert await reads.get(["b24test:a"]) == [b"2"]  # nothing cached: each read asks Redis
    assert reads.mgets == 2


async def test_every_job_of_a_failed_mget_learns_why(redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = JoinedReads(redis)

    async def redis_away(*args: Any) -> None:
        raise RedisConnectionError("Redis went away")

    monkeypatch.setattr(redis, "mget", redis_away)
    answers = await asyncio.gather(reads.get(["b24test:a"]), reads.get(["b24test:b"]), return_exceptions=True)

    assert [type(a) for a in answers] == [RedisConnectionError, RedisConnectionError]


async def test_a_job_cancelled_while_waiting_leaves_the_others_their_answers(redis: Any) -> None:
    await redis.mset({"b24test:a": "1", "b24test:b": "2"})
    reads = JoinedReads(redis)
    cancelled = asyncio.ensure_future(reads.get(["b24test:a"]))
    kept = asyncio.ensure_future(reads.get(["b24test:b"]))
    await asyncio.sleep(0)
    cancelled.cancel()

    assert await kept == [b"2"]
    assert cancelled.cancelled()


async def test_a_stopping_worker_leaves_no_job_waiting_for_a_read(redis: Any) -> None:
    reads = JoinedReads(redis)
    waiting = asyncio.ensure_future(reads.get(["b24test:a"]))
    await asyncio.sleep(0)  # the read is queued; its MGET not yet sent

    await reads.close()

    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, timeout=5)  # cancelled, not left waiting for good
    await redis.set("b24test:a", "1")
    assert await asyncio.wait_for(reads.get(["b24test:a"]), timeout=5) == [b"1"]  # and nothing is stuck


async def test_the_loop_guard_reads_through_the_joined_reads(redis: Any) -> None:
    reads = JoinedReads(redis)
    changes = ChangeLog(redis, "acme", reads)
    await record_changes(redis, changes, 7, times=MAX_CHANGES_PER_WINDOW)
    await record_changes(redis, changes, 8)

    looping = await asyncio.gather(changes.looping([7, 8]), changes.looping([8, 9]))

    assert looping == [{7}, set()]
    assert reads.mgets == 1


async def test_a_busy_worker_reads_its_jobs_loop_guards_together(client: Any, make_worker: Any,
                                                                  portal: FakePortal) -> None:
    for _ in range(12):
        lead = portal.add_lead()
        portal.convert_lead(lead)
        await post_event(client, "ONCRMACTIVITYADD", portal.add_activity([(LEAD, lead)]))
    worker = make_worker(max_jobs=12)

    assert await worker.run_check() == 12

    assert 1 <= worker.ctx["joined_reads"].mgets < 12
