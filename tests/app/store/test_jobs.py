"""The job store's scripts: a job accepted whole or not at all, and saves that survive a Redis that forgot
its scripts."""
from __future__ import annotations

import json

from arq.connections import ArqRedis

from app.store.jobs import JobQuery, JobRecord, JobState, JobStore
from app.store.queue import JobQueue


async def test_a_record_and_its_queue_entry_are_written_once(redis: ArqRedis) -> None:
    queue = JobQueue(redis, JobStore(redis, 3600))
    record = JobRecord.for_event("acme", "ONCRMACTIVITYADD", 7, "1766047124")

    assert await queue.submit(record) is True
    assert await queue.submit(record.model_copy()) is False  # the same delivery again: nothing new

    assert await redis.zscore("arq:queue", record.id) is not None
    assert (await queue.store.get(record.id)).state is JobState.QUEUED


async def test_a_record_without_a_queue_entry_is_listed_but_not_queued(redis: ArqRedis) -> None:
    store = JobStore(redis, 3600)
    record = JobRecord.for_event("acme", "ONCRMLEADUPDATE", 8, "1766047124")

    assert await store.create(record) is True
    assert await store.create(record) is False

    assert await redis.zcard("arq:queue") == 0
    listed = await store.list(JobQuery(state=JobState.QUEUED))
    assert [r.id for r in listed.records] == [record.id]


async def test_saves_go_on_after_redis_forgets_its_scripts(redis: ArqRedis) -> None:
    """A restarted Redis has an empty script cache: the store loads its scripts again by itself."""
    store = JobStore(redis, 3600)
    record = JobRecord.for_event("acme", "ONCRMACTIVITYADD", 9, "1766047124")
    await store.create(record)

    await redis.script_flush()
    record.state = JobState.SUCCEEDED
    await store.save(record)
    await redis.script_flush()
    record.outcome = "re-bound 1 item"
    async with redis.pipeline(transaction=False) as pipe:
        await store.stage_save(pipe, record)
        await pipe.execute()

    saved = await store.get(record.id)
    assert (saved.state, saved.outcome) == (JobState.SUCCEEDED, "re-bound 1 item")
    assert [r.id for r in (await store.list(JobQuery(state=JobState.SUCCEEDED))).records] == [record.id]
    assert (await store.list(JobQuery(state=JobState.QUEUED))).records == []
    await store.create(JobRecord.for_event("acme", "ONCRMACTIVITYADD", 10, "1766047124"))  # and creates, too


def test_a_record_written_with_bindings_as_text_reads_as_values_and_is_found_by_its_lead() -> None:
    """Records live 14 days: those of the release before, which kept bindings as text, still read."""
    raw = json.dumps({"id": "old1", "portal": "acme", "event": "ONCRMACTIVITYADD", "entity_id": 9, "state": "succeeded",
                      "plan": [{"activity": 9, "before": ["lead 7"], "after": ["contact 3", "type128 5"],
                                "move": ["company 1 -> company 2"]}],
                      "changes": [{"activity": 9, "before": ["lead 7"], "after": ["contact 3"], "status": "changed"}]})

    record = JobRecord.model_validate_json(raw)

    assert record.plan[0]["after"] == [{"entity_type": 3, "entity_id": 3}, {"entity_type": 128, "entity_id": 5}]
    assert record.plan[0]["move"] == [{"from": {"entity_type": 4, "entity_id": 1},
                                       "to": {"entity_type": 4, "entity_id": 2}}]
    assert record.changes[0]["before"] == [{"entity_type": 1, "entity_id": 7}]
    assert JobQuery(lead=7).matches(record) and not JobQuery(lead=3).matches(record)
