"""B24_REDIS_MIN_REPLICAS: a job counts as accepted once a replica has it, and not before.

A real primary and replica on loopback; the replica is stopped (SIGSTOP) to stand for one that lags
or is cut off: the job is then in the primary only, which a failover could lose, so the web process
keeps the event in its spool until the replica confirms it.
"""
from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from arq.connections import ArqRedis

from app.fakeportal import LEAD, FakePortal
from app.rules.model import RuleSet
from app.settings import Settings
from app.store.jobs import JOB_KEY, JobRecord, JobStore
from app.store.queue import JobQueue, ReplicasNotConfirmed, connect
from app.web import create_app
from tests.support.replication import ReplicatedRedis
from tests.conftest import post_event


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[ReplicatedRedis]:
    servers = ReplicatedRedis(tmp_path).start()
    yield servers
    servers.stop()


@pytest.fixture
async def primary(replicated: ReplicatedRedis) -> AsyncIterator[ArqRedis]:
    redis = await connect(f"redis://127.0.0.1:{replicated.primary.port}/0")
    yield redis
    await redis.aclose()


def on_replica(replicated: ReplicatedRedis, job_id: str) -> bool:
    with replicated.replica.client() as replica:
        return bool(replica.exists(JOB_KEY + job_id))


async def test_a_job_is_accepted_once_the_replica_has_it(replicated: ReplicatedRedis, primary: ArqRedis) -> None:
    queue = JobQueue(primary, JobStore(primary, 3600), min_replicas=1)
    record = JobRecord.for_event("acme", "ONCRMACTIVITYADD", 7, "1766047124", "975")

    assert await queue.submit(record) is True
    assert on_replica(replicated, record.id)  # no waiting here: WAIT said so before submit returned
    again = JobRecord.for_event("acme", "ONCRMACTIVITYADD", 7, "1766047124", "975")
    assert await queue.submit(again) is False  # the same delivery: nothing new, and no error


async def test_a_replica_that_does_not_confirm_makes_the_job_not_accepted_yet(
        replicated: ReplicatedRedis, primary: ArqRedis) -> None:
    queue = JobQueue(primary, JobStore(primary, 3600), min_replicas=1)
    record = JobRecord.for_event("acme", "ONCRMACTIVITYADD", 8, "1766047124", "975")
    replicated.replica.signal(signal.SIGSTOP)
    try:
        with pytest.raises(ReplicasNotConfirmed, match=r"only 0 of 1 Redis replicas .*INFO replication"):
            await queue.submit(record)
        assert await primary.exists(JOB_KEY + record.id)  # written, but only on the primary
    finally:
        replicated.replica.signal(signal.SIGCONT)
    # A second try of the same job (as the spool's drain makes) is a duplicate, and confirmed now.
    assert await JobQueue(primary, JobStore(primary, 3600), min_replicas=1).submit(record) is False
    assert on_replica(replicated, record.id)


async def test_without_min_replicas_nothing_waits_for_a_replica(replicated: ReplicatedRedis, primary: ArqRedis) -> None:
    queue = JobQueue(primary, JobStore(primary, 3600))
    record = JobRecord.for_event("acme", "ONCRMACTIVITYADD", 9, "1766047124", "975")
    replicated.replica.signal(signal.SIGSTOP)
    try:
        assert await queue.submit(record) is True
    finally:
        replicated.replica.signal(signal.SIGCONT)


async def test_the_endpoint_spools_an_event_no_replica_confirmed_and_queues_it_once_one_does(
        replicated: ReplicatedRedis, primary: ArqRedis, aiohttp_client: Any, portal: FakePortal, rules: RuleSet,
        tmp_path: Path) -> None:
    settings = Settings(_env_file=None, redis_url=f"redis://127.0.0.1:{replicated.primary.port}/0",
                        redis_min_replicas=1, data_dir=tmp_path, rules=tmp_path / "rules.yaml")
    client = await aiohttp_client(create_app(settings, rules))
    lead = portal.add_lead()
    portal.convert_lead(lead)
    confirmed = portal.add_activity([(LEAD, lead)])
    late = portal.add_activity([(LEAD, lead)])

    status, answer = await post_event(client, "ONCRMACTIVITYADD", confirmed)
    assert (status, answer.get("spooled")) == (200, None), answer
    replicated.replica.signal(signal.SIGSTOP)
    try:
        status, spooled = await post_event(client, "ONCRMACTIVITYADD", late)
        assert (status, spooled.get("spooled")) == (200, True), spooled  # safe on disk, not only in the primary
    finally:
        replicated.replica.signal(signal.SIGCONT)

    deadline = time.monotonic() + 60
    while not on_replica(replicated, spooled["job_id"]) or any((tmp_path / "spool").glob("spool-*.jsonl")):
        assert time.monotonic() < deadline, "the spooled event never reached the replica"
        await asyncio.sleep(0.2)
    assert on_replica(replicated, answer["job_id"])
