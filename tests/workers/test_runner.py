"""How a worker takes, runs and closes event jobs (`workers/runner.py`): arq's rules, fewer round trips.

That due jobs are claimed and run, exactly once among several workers, every end-to-end test shows;
that a killed worker's job runs again, the chaos suite.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from arq import Worker
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from redis.exceptions import ConnectionError as RedisConnectionError

from app.fakeportal import LEAD, FakePortal
from app.store.jobs import JobState, JobStore
from app.store.queue import LIVE_QUEUE, PROCESS_EVENT, STRANDED_AFTER, JobQueue
from tests.conftest import post_event
from workers import tasks
from workers.main import MAX_TRIES, POLL_DELAY, build_worker, startup
from workers.runner import LeasedWorker
from workers.tasks import LOCK_WAIT


async def started(worker: Worker) -> Worker:
    """A worker ready to run jobs handed to it directly, as `main` makes it before polling."""
    worker.ctx["redis"] = worker.pool
    await startup(worker.ctx)
    return worker


async def run_one(worker: Worker, job_id: str) -> None:
    """Claim and run one queued job, as a poll would."""
    await worker.start_jobs([job_id.encode()])
    await worker.tasks[job_id]


async def queued_job(client: Any, portal: FakePortal) -> str:
    return await queued_job_on(client, portal, portal.add_lead())


async def queued_job_on(client: Any, portal: FakePortal, lead: int) -> str:
    activity = portal.add_activity([(LEAD, lead)])
    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    return str(answer["job_id"])


async def test_a_job_another_worker_holds_is_left_alone(client: Any, make_worker: Any, portal: FakePortal,
                                                       redis: Any) -> None:
    job_id = await queued_job(client, portal)
    await redis.psetex(in_progress_key_prefix + job_id, 10_000, b"1")
    worker = make_worker()

    await worker.start_jobs([job_id.encode()])

    assert job_id not in worker.tasks
    assert worker.job_counter == 0  # the slot it reserved is free again


async def test_a_job_put_back_for_later_is_not_started_early(client: Any, make_worker: Any, portal: FakePortal,
                                                            redis: Any) -> None:
    job_id = await queued_job(client, portal)
    await redis.zadd(LIVE_QUEUE, {job_id: int(time.time() * 1000) + 60_000})
    worker = make_worker()

    await worker.start_jobs([job_id.encode()])

    assert job_id not in worker.tasks
    assert await redis.exists(in_progress_key_prefix + job_id) == 0


async def test_the_record_read_with_the_claim_is_used_once_and_not_kept(client: Any, make_worker: Any,
                                                                       portal: FakePortal,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_second_read(self: JobStore, job_id: str) -> None:
        raise AssertionError("the job read its record again")

    monkeypatch.setattr(JobStore, "get", no_second_read)
    lead = portal.add_lead()
    portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    worker = make_worker()

    await worker.run_check()
    monkeypatch.undo()  # the API reads records the usual way

    job = await (await client.get(f"/api/jobs/{answer['job_id']}")).json()
    assert (job["state"], job["trigger"], len(job["attempts"])) == ("succeeded", "webhook", 1)
    assert worker._claims == {}


async def test_a_finished_job_takes_itself_off_the_queue_and_leaves_nothing_of_arqs(
        client: Any, make_worker: Any, portal: FakePortal, redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    finished_by_arq: list[str] = []

    async def finish_job(self: Worker, job_id: str, *args: Any) -> None:
        finished_by_arq.append(job_id)

    monkeypatch.setattr(Worker, "finish_job", finish_job)
    lead = portal.add_lead()
    portal.convert_lead(lead)
    job_id = await queued_job_on(client, portal, lead)

    assert await make_worker().run_check() == 1

    assert finished_by_arq == []  # the job's own last pipeline did it
    assert await redis.zscore(LIVE_QUEUE, job_id) is None
    for prefix in (in_progress_key_prefix, job_key_prefix, retry_key_prefix, "arq:result:"):
        assert await redis.exists(prefix + job_id) == 0, prefix
    assert (await JobStore(redis, 3600).get(job_id)).state.value == "succeeded"  # type: ignore[union-attr]


async def test_a_job_waiting_for_its_lead_goes_back_in_the_queue_for_later(
        client: Any, make_worker: Any, portal: FakePortal, redis: Any) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    await redis.set(f"b24:lock:acme:lead:{lead}", "another job", px=60_000)
    _, answer = await post_event(client, "ONCRMLEADUPDATE", lead)
    job_id = str(answer["job_id"])
    worker = await started(make_worker())

    before = time.time() * 1000
    await run_one(worker, job_id)

    assert worker.jobs_retried == 1
    assert await redis.zscore(LIVE_QUEUE, job_id) >= before + LOCK_WAIT * 1000
    assert await redis.exists(job_key_prefix + job_id) == 1  # still there to run again
    assert await redis.exists(in_progress_key_prefix + job_id) == 0  # and free to be claimed then
    assert await redis.get(retry_key_prefix + job_id) == b"0"  # waiting spends none of its tries
    assert await redis.get(f"b24:lock:acme:lead:{lead}") == b"another job"  # not ours to release
    record = await JobStore(redis, 3600).get(job_id)
    assert record is not None and record.state.value == "retrying" and "waiting" in record.outcome


async def test_a_lead_job_lets_go_of_the_lead_when_it_ends(client: Any, make_worker: Any, portal: FakePortal,
                                                          redis: Any) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    portal.add_activity([(LEAD, lead)])
    await post_event(client, "ONCRMLEADUPDATE", lead)

    await make_worker().run_check()

    assert await redis.exists(f"b24:lock:acme:lead:{lead}") == 0


@pytest.mark.parametrize("why", ["its data expired", "it is past its tries"])
async def test_a_job_that_cannot_run_is_taken_off_the_queue(why: str, client: Any, make_worker: Any,
                                                            portal: FakePortal, redis: Any) -> None:
    job_id = await queued_job(client, portal)
    if why == "its data expired":
        await redis.delete(job_key_prefix + job_id)
    else:
        await redis.set(retry_key_prefix + job_id, MAX_TRIES)
    worker = make_worker()

    await run_one(worker, job_id)

    assert (worker.jobs_failed, worker.jobs_complete) == (1, 0)
    assert await redis.zscore(LIVE_QUEUE, job_id) is None
    for prefix in (in_progress_key_prefix, job_key_prefix, retry_key_prefix):
        assert await redis.exists(prefix + job_id) == 0, prefix
    if why == "it is past its tries":  # its record must not say it is still to run
        record = await JobStore(redis, 3600).get(job_id)
        assert record is not None and record.state.value == "dead" and record.error is not None
        assert record.outcome == f"gave up after {MAX_TRIES} tries" and record.error["code"] == "TOO_MANY_TRIES"


async def test_a_busy_worker_starts_the_next_job_when_a_slot_frees_not_at_the_next_poll(
        client: Any, make_worker: Any, portal: FakePortal, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = [await queued_job(client, portal) for _ in range(8)]
    worker = make_worker(max_jobs=2)
    worker.poll_delay_s = 2.0  # arq would start two jobs a poll, and poll every 2 s
    claims_by_poll: list[int] = []
    claim, poll = LeasedWorker._claim, Worker._poll_iteration

    async def counted_claim(self: LeasedWorker, job_id: str) -> Any:
        claims_by_poll[-1] += 1
        return await claim(self, job_id)

    async def counted_poll(self: Worker) -> None:
        claims_by_poll.append(0)
        await poll(self)

    monkeypatch.setattr(LeasedWorker, "_claim", counted_claim)
    monkeypatch.setattr(Worker, "_poll_iteration", counted_poll)

    assert await worker.run_check() == len(jobs)
    assert claims_by_poll[0] == len(jobs)


async def test_a_worker_has_the_slots_the_settings_give_it(settings: Any, rules: Any, redis: Any) -> None:
    worker = build_worker(settings.model_copy(update={"worker_jobs": 7}), rules, redis, handle_signals=False)

    assert worker.max_jobs == 7
    assert worker.poll_delay_s == POLL_DELAY


async def test_a_job_past_its_time_limit_goes_back_in_the_queue_and_continues_later(
        client: Any, make_worker: Any, portal: FakePortal, redis: Any) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    job_id = await queued_job_on(client, portal, lead)
    portal.stall_next(1, 2.0)
    worker = await started(make_worker())
    worker.functions[PROCESS_EVENT].timeout_s = 0.3

    await run_one(worker, job_id)

    record = await JobStore(redis, 3600).get(job_id)
    assert record is not None and record.state.value == "retrying"
    assert record.error is not None and record.error["code"] == "JOB_TIMEOUT"
    assert await redis.zscore(LIVE_QUEUE, job_id) is not None  # back in the queue, not dropped
    assert await redis.exists(job_key_prefix + job_id) == 1

    worker.functions[PROCESS_EVENT].timeout_s = 30
    await worker.run_check()
    record = await JobStore(redis, 3600).get(job_id)
    assert record is not None and record.state.value == "succeeded"
    assert [a.outcome for a in record.attempts] == ["retrying", "succeeded"]


async def test_a_job_that_never_finishes_in_time_ends_dead_not_lost(client: Any, make_worker: Any,
                                                                     portal: FakePortal, redis: Any) -> None:
    job_id = await queued_job(client, portal)
    portal.stall_next(50, 1.0)
    worker = make_worker()
    worker.functions[PROCESS_EVENT].timeout_s = 0.1

    await worker.run_check()

    record = await JobStore(redis, 3600).get(job_id)
    assert record is not None and record.state.value == "dead"
    assert record.error is not None and record.error["code"] == "JOB_TIMEOUT"
    assert len(record.attempts) == 6  # the first and five retries (the test workers' retry delays)
    assert await redis.zscore(LIVE_QUEUE, job_id) is None


async def test_a_stopping_worker_leaves_its_job_queued_and_the_record_says_so(
        client: Any, make_worker: Any, portal: FakePortal, redis: Any) -> None:
    job_id = await queued_job(client, portal)
    portal.stall_next(1, 5.0)
    worker = await started(make_worker())
    await worker.start_jobs([job_id.encode()])
    await asyncio.sleep(0.2)  # the job is waiting for the portal

    worker.tasks[job_id].cancel()  # as arq's close does with running jobs
    await asyncio.gather(worker.tasks[job_id], return_exceptions=True)

    record = await JobStore(redis, 3600).get(job_id)
    assert record is not None and record.state.value == "retrying"
    assert record.attempts[-1].outcome == "interrupted"
    assert await redis.zscore(LIVE_QUEUE, job_id) is not None
    assert await redis.exists(job_key_prefix + job_id) == 1
    assert await redis.exists(in_progress_key_prefix + job_id) == 0  # free for the next worker at once


async def test_a_job_whose_last_save_fails_goes_back_in_the_queue_not_away(
        client: Any, make_worker: Any, portal: FakePortal, redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    job_id = await queued_job_on(client, portal, lead)
    save = tasks._save_attempt

    async def redis_goes_away(*args: Any, **kwargs: Any) -> None:
        raise RedisConnectionError("Connection reset by peer")

    monkeypatch.setattr(tasks, "_save_attempt", redis_goes_away)
    worker = await started(make_worker())

    await run_one(worker, job_id)

    assert await redis.zscore(LIVE_QUEUE, job_id) > time.time() * 1000  # later, not dropped
    assert await redis.exists(job_key_prefix + job_id) == 1
    monkeypatch.setattr(tasks, "_save_attempt", save)
    await redis.zadd(LIVE_QUEUE, {job_id: 0})  # no need to wait the delay out
    await worker.run_check()
    record = await JobStore(redis, 3600).get(job_id)
    # The first run's changes stand (the activity left the lead); the second run, counted as the job's
    # second try, finds nothing left to do.
    assert record is not None and record.state.value == "skipped"
    assert [attempt.number for attempt in record.attempts] == [2]


async def test_a_poll_spends_no_round_trip_on_the_workers_own_running_jobs(
        client: Any, make_worker: Any, portal: FakePortal, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = await queued_job(client, portal)
    portal.stall_next(1, 5.0)
    worker = await started(make_worker())
    await worker.start_jobs([job_id.encode()])  # running: waiting for the portal, still in the queue
    claimed: list[str] = []

    async def no_claim(self: LeasedWorker, job_id: str) -> None:
        claimed.append(job_id)

    monkeypatch.setattr(LeasedWorker, "_claim", no_claim)

    await worker.start_jobs([job_id.encode()])  # the next poll reads it again

    assert claimed == []
    worker.tasks[job_id].cancel()
    await asyncio.gather(worker.tasks[job_id], return_exceptions=True)


async def test_a_stopping_worker_starts_nothing_more_even_in_the_middle_of_a_poll(
        client: Any, make_worker: Any, portal: FakePortal) -> None:
    first, second = await queued_job(client, portal), await queued_job(client, portal)
    portal.stall_next(1, 0.5)
    worker = await started(make_worker(max_jobs=1))
    worker.poll_delay_s = 5.0
    polling = asyncio.create_task(worker.start_jobs([first.encode(), second.encode()]))
    await asyncio.sleep(0.1)  # the first job runs; the poll waits for its slot to start the second

    worker.allow_pick_jobs = False  # as `b24rebind` does on SIGTERM
    await asyncio.wait_for(polling, timeout=5)

    assert list(worker.tasks) == [first]
    await worker.tasks[first]


async def test_a_job_waiting_for_a_long_lead_job_waits_past_its_tries_and_keeps_one_wait_on_record(
        client: Any, make_worker: Any, portal: FakePortal, redis: Any) -> None:
    lead = portal.add_lead()
    portal.add_activity([(LEAD, lead)])
    portal.convert_lead(lead)
    await redis.set(f"b24:lock:acme:lead:{lead}", "a long conversion", px=60_000)
    _, answer = await post_event(client, "ONCRMLEADUPDATE", lead)
    job_id = str(answer["job_id"])
    worker = await started(make_worker())

    for _ in range(MAX_TRIES + 5):  # more waits than it has tries
        await redis.zadd(LIVE_QUEUE, {job_id: 0})  # no need to wait the delay out
        await run_one(worker, job_id)
    await redis.delete(f"b24:lock:acme:lead:{lead}")  # the conversion ends
    await redis.zadd(LIVE_QUEUE, {job_id: 0})
    await run_one(worker, job_id)

    record = await JobStore(redis, 3600).get(job_id)
    assert record is not None and record.state.value == "succeeded", record
    assert [a.outcome for a in record.attempts] == ["deferred", "succeeded"]  # the waits, kept as one


async def converted_lead_job(client: Any, portal: FakePortal) -> str:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    return await queued_job_on(client, portal, lead)


async def test_an_attempt_cut_off_by_a_killed_worker_is_recorded_as_interrupted(
        client: Any, make_worker: Any, portal: FakePortal, redis: Any) -> None:
    job_id = await converted_lead_job(client, portal)
    store = JobStore(redis, 3600)
    record = await store.get(job_id)
    assert record is not None
    record.begin_attempt(1)  # saved as running (the job ran past SHOW_RUNNING_AFTER), then the worker died
    await store.save(record)

    await make_worker().run_check()

    record = await store.get(job_id)
    assert record is not None and [a.outcome for a in record.attempts] == ["interrupted", "succeeded"]
    assert record.attempts[0].finished_at is not None


async def test_records_left_waiting_with_no_job_behind_them_are_queued_again(
        client: Any, make_worker: Any, portal: FakePortal, redis: Any) -> None:
    stranded, healthy = await converted_lead_job(client, portal), await converted_lead_job(client, portal)
    store = JobStore(redis, 3600)
    for job_id in (stranded, healthy):
        record = await store.get(job_id)
        assert record is not None
        record.state = JobState.RETRYING
        await store.save(record)
    await redis.delete(job_key_prefix + stranded)  # arq dropped it, say, or a Redis lost it
    await redis.zrem(LIVE_QUEUE, stranded)
    queue = JobQueue(redis, store)

    assert await queue.requeue_stranded(now=time.time()) == []  # too recent to tell
    assert await queue.requeue_stranded(now=time.time() + STRANDED_AFTER + 1) == [stranded]
    assert await queue.requeue_stranded(now=time.time() + STRANDED_AFTER + 1) == []  # queued now: once is enough

    rescued = await store.get(stranded)
    assert rescued is not None and rescued.state == JobState.QUEUED and "left the queue" in rescued.outcome
    await make_worker().run_check()
    assert [(await store.get(i)).state for i in (stranded, healthy)] == [JobState.SUCCEEDED] * 2  # type: ignore
