"""How a worker takes, runs and closes event jobs (`workers/runner.py`): arq's own, with a lease.

That due jobs are claimed and run, exactly once among several workers, every end-to-end test shows;
that a killed worker's job runs again, the chaos suite.
"""
from __future__ import annotations

import ast
import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from arq import Worker
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix
from redis.exceptions import ConnectionError as RedisConnectionError

from app.fakeportal import LEAD, FakePortal
from app.store.jobs import JobState, JobStore
from app.store.queue import LIVE_QUEUE, STRANDED_AFTER, JobQueue
from tests.conftest import post_event
from tests.support.waiting import until
from tests.support.workers import run_one, started
from workers import runner, tasks
from workers.context import context_of
from workers.main import MAX_TRIES, POLL_DELAY, build_worker
from workers.tasks import MAX_RUNS
from workers.runner import LeasedWorker
from workers.outcomes import LOCK_WAIT


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


async def test_a_job_put_back_for_later_is_not_started_early(client: Any, make_worker: Any, portal: FakePortal,
                                                            redis: Any) -> None:
    job_id = await queued_job(client, portal)
    await redis.zadd(LIVE_QUEUE, {job_id: int(time.time() * 1000) + 60_000})
    worker = make_worker()

    await worker.start_jobs([job_id.encode()])

    assert job_id not in worker.tasks
    assert await redis.exists(in_progress_key_prefix + job_id) == 0


async def test_a_finished_job_leaves_nothing_of_arqs_behind(client: Any, make_worker: Any, portal: FakePortal,
                                                            redis: Any) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    job_id = await queued_job_on(client, portal, lead)

    assert await make_worker().run_check() == 1

    assert await redis.zscore(LIVE_QUEUE, job_id) is None
    for prefix in (in_progress_key_prefix, job_key_prefix, retry_key_prefix, "arq:result:"):
        assert await redis.exists(prefix + job_id) == 0, prefix  # the job record is its result
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
    assert await redis.get(f"b24:lock:acme:lead:{lead}") == b"another job"  # not ours to release
    record = await JobStore(redis, 3600).get(job_id)
    assert record is not None and record.state.value == "retrying" and "waiting" in record.outcome
    assert record.failures == 0  # waiting spends none of its tries (counted on the record, not by arq)


async def test_a_lead_job_lets_go_of_the_lead_when_it_ends(client: Any, make_worker: Any, portal: FakePortal,
                                                          redis: Any) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    portal.add_activity([(LEAD, lead)])
    await post_event(client, "ONCRMLEADUPDATE", lead)

    await make_worker().run_check()

    assert await redis.exists(f"b24:lock:acme:lead:{lead}") == 0


@pytest.mark.parametrize("why", ["its data expired", "it is past its tries"])
async def test_a_job_that_cannot_run_is_taken_off_the_queue_or_queued_again_from_its_record(why: str, client: Any, make_worker: Any,
                                                            portal: FakePortal, redis: Any) -> None:
    job_id = await queued_job(client, portal)
    if why == "its data expired":
        await redis.delete(job_key_prefix + job_id)
    else:
        await redis.set(retry_key_prefix + job_id, MAX_TRIES)
    worker = await started(make_worker())

    await run_one(worker, job_id)

    assert (worker.jobs_failed, worker.jobs_complete) == (1, 0)
    if why == "its data expired":  # (a Redis that lost its data): its record still waits, so it is queued again
        record = await JobStore(redis, 3600).get(job_id)
        assert record is not None and record.state.value == "queued" and "arq had lost its job" in record.outcome
        assert await redis.exists(job_key_prefix + job_id) == 1 and await redis.zscore(LIVE_QUEUE, job_id)
        return
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
    runs_by_poll: list[int] = []
    run, start = LeasedWorker.run_job, LeasedWorker.start_jobs

    async def counted_run(self: LeasedWorker, job_id: str, score: int) -> None:
        runs_by_poll[-1] += 1
        await run(self, job_id, score)

    async def counted_start(self: LeasedWorker, job_ids: list[bytes]) -> None:
        # arq's poll hands its ids to the public start_jobs once a poll: counted there, not in arq's insides
        runs_by_poll.append(0)
        await start(self, job_ids)

    monkeypatch.setattr(LeasedWorker, "run_job", counted_run)
    monkeypatch.setattr(LeasedWorker, "start_jobs", counted_start)

    assert await worker.run_check() == len(jobs)
    assert runs_by_poll[0] == len(jobs)


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
    context_of(worker.ctx).job_timeout = 0.3

    await run_one(worker, job_id)

    record = await JobStore(redis, 3600).get(job_id)
    assert record is not None and record.state.value == "retrying"
    assert record.error is not None and record.error["code"] == "JOB_TIMEOUT"
    assert await redis.zscore(LIVE_QUEUE, job_id) is not None  # back in the queue, not dropped
    assert await redis.exists(job_key_prefix + job_id) == 1

    context_of(worker.ctx).job_timeout = 30
    await worker.run_check()
    record = await JobStore(redis, 3600).get(job_id)
    assert record is not None and record.state.value == "succeeded"
    assert [a.outcome for a in record.attempts] == ["retrying", "succeeded"]


async def test_a_job_that_never_finishes_in_time_ends_dead_not_lost(client: Any, make_worker: Any,
                                                                     portal: FakePortal, redis: Any) -> None:
    job_id = await queued_job(client, portal)
    portal.stall_next(50, 1.0)
    worker = make_worker(job_timeout=0.1)

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
    await until(lambda: portal.stalls_left == 0, 30, "the job's request to wait at the portal")

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
    await redis.zadd(LIVE_QUEUE, {job_id: 1})  # no need to wait the delay out (arq takes a score of 0 for none)
    await worker.run_check()
    record = await JobStore(redis, 3600).get(job_id)
    # The first run's changes stand (the activity left the lead) though its end was never saved; the
    # second run, counted as the job's second try, finds nothing left to do.
    assert record is not None and record.state.value == "skipped"
    assert [(attempt.number, attempt.outcome) for attempt in record.attempts] == [(1, "interrupted"), (2, "skipped")]


async def test_a_poll_spends_no_round_trip_on_the_workers_own_running_jobs(
        client: Any, make_worker: Any, portal: FakePortal, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = await queued_job(client, portal)
    portal.stall_next(1, 5.0)
    worker = await started(make_worker())
    await worker.start_jobs([job_id.encode()])  # running: waiting for the portal, still in the queue
    claimed: list[bytes] = []

    async def no_claim(self: Worker, job_ids: list[bytes]) -> None:
        claimed.extend(job_ids)

    monkeypatch.setattr(Worker, "start_jobs", no_claim)

    await worker.start_jobs([job_id.encode()])  # the next poll reads it again

    assert claimed == []
    worker.tasks[job_id].cancel()
    await asyncio.gather(worker.tasks[job_id], return_exceptions=True)


async def test_a_stopping_worker_starts_nothing_more_even_in_the_middle_of_a_poll(
        client: Any, make_worker: Any, portal: FakePortal) -> None:
    first, second = await queued_job(client, portal), await queued_job(client, portal)
    portal.stall_next(1, 2.0)  # long enough that the slot is still taken when the poll is stopped
    worker = await started(make_worker(max_jobs=1))
    worker.poll_delay_s = 5.0
    polling = asyncio.create_task(worker.start_jobs([first.encode(), second.encode()]))
    # The first job runs (its request waits at the portal); the poll waits for its slot to start the second.
    await until(lambda: portal.stalls_left == 0, 30, "the first job's request to wait at the portal")

    worker.allow_pick_jobs = False  # as `b24rebind` does on SIGTERM
    await asyncio.wait_for(polling, timeout=5)

    assert list(worker.tasks) == [first]
    await worker.tasks[first]


async def test_a_job_waiting_for_a_long_lead_job_waits_past_its_runs_and_keeps_one_wait_on_record(
        client: Any, make_worker: Any, portal: FakePortal, redis: Any) -> None:
    lead = portal.add_lead()
    portal.add_activity([(LEAD, lead)])
    portal.convert_lead(lead)
    await redis.set(f"b24:lock:acme:lead:{lead}", "a long conversion", px=60_000)
    _, answer = await post_event(client, "ONCRMLEADUPDATE", lead)
    job_id = str(answer["job_id"])
    worker = await started(make_worker())

    for _ in range(MAX_RUNS + 5):  # more waits than it may have runs
        await redis.zadd(LIVE_QUEUE, {job_id: 1})  # no need to wait the delay out (arq takes a score of 0 for none)
        await run_one(worker, job_id)
    await redis.delete(f"b24:lock:acme:lead:{lead}")  # the conversion ends
    await redis.zadd(LIVE_QUEUE, {job_id: 1})
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
    record.begin_attempt(1)  # saved as running, then the worker died
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


async def test_a_stranded_job_whose_old_result_arq_still_keeps_is_queued_again_for_real(
        client: Any, make_worker: Any, portal: FakePortal, redis: Any) -> None:
    """arq refuses (returns None for) a job id it keeps a result for: the rescue must not say "queued
    again" while nothing is queued, minute after minute."""
    stranded = await converted_lead_job(client, portal)
    store = JobStore(redis, 3600)
    record = await store.get(stranded)
    assert record is not None
    record.state = JobState.RUNNING
    await store.save(record)
    await redis.delete(job_key_prefix + stranded)
    await redis.zrem(LIVE_QUEUE, stranded)
    await redis.set(result_key_prefix + stranded, b"an earlier run's result", ex=3600)  # as arq keeps one
    queue = JobQueue(redis, store)

    assert await queue.requeue_stranded(now=time.time() + STRANDED_AFTER + 1) == [stranded]

    assert await redis.zscore(LIVE_QUEUE, stranded) is not None  # really queued
    await make_worker().run_check()
    rescued = await store.get(stranded)
    assert rescued is not None and rescued.state == JobState.SUCCEEDED, rescued


def test_the_runner_uses_only_arqs_public_worker_api() -> None:
    """arq as a library: no override of arq's private methods, no use of its private attributes or of
    its slot bookkeeping (`sem`, `job_counter`), no copy of its loop to keep in step with new versions."""
    tree = ast.parse(Path(runner.__file__).read_text())
    leased = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "LeasedWorker")
    own = {node.name for node in leased.body if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef)}
    own |= {target.attr for node in ast.walk(leased) if isinstance(node, ast.Assign | ast.AnnAssign)
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(target, ast.Attribute)}
    used = {node.attr for node in ast.walk(leased)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"}
    arqs = set(vars(Worker))

    assert not {name for name in own & arqs if name.startswith("_") and name != "__init__"}  # no private override
    assert not {name for name in used - own if name.startswith("_")}  # no private attribute of arq's
    assert not used & {"sem", "job_counter"}


async def test_a_worker_keeps_what_its_jobs_share_under_one_key(make_worker: Any) -> None:
    worker = await started(make_worker())

    assert set(worker.ctx) == {"redis", "b24rebind"}  # arq's own, and the worker's context
    context = context_of(worker.ctx)
    assert context.redis is worker.pool and context.retry_delays == (0.05, 0.1, 0.2, 0.3, 0.5)
