"""The job store: records kept in Redis, written together with their queue entries in one atomic script.

A record (`app.store.job_record`) says what happened to each accepted event; a job list's filters and
pages are `app.store.job_query`. Both are named here too, where most code imports them from. The accept
script (`_CREATE_QUEUED`) writes the record, its indexes and arq's job in one step: nothing accepted is
lost, and a delivery seen before changes nothing (tests/app/store/test_arq_enqueue.py pins it).
"""
from __future__ import annotations

import builtins
import time
from dataclasses import dataclass
from typing import Any

import orjson
from arq.constants import job_key_prefix, result_key_prefix
from redis.asyncio import Redis

from app.settings import Settings
from app.store.job_query import Cursor, JobPage, JobQuery
from app.store.job_record import (
    FINAL_STATES,
    INDEX_PREFIX,
    JOB_INDEX,
    JOB_KEY,
    Attempt,
    JobRecord,
    JobState,
    UnknownJob,
    is_job_id,
    reapply_note,
)
from app.store.namespace import prefixed
from app.store.redis_typing import awaited

# Re-exported: the records and queries are imported from here by most of the code.
__all__ = [
    "FEED", "FINAL_STATES", "INDEX_PREFIX", "INDEXES", "JOB_INDEX", "JOB_KEY", "MAX_RECORDS", "TRIM_EVERY",
    "Attempt", "Cursor", "JobPage", "JobQuery", "JobRecord", "JobState", "JobStore", "QueueEntry",
    "UnknownJob", "feed_channel", "is_job_id", "reapply_note",
]

INDEXES = "b24:jobs:indexes"  # the names of those sorted sets, for trimming
FEED = "b24:jobs:feed:"  # + db number: pub/sub channel with a job's summary at each transition
MAX_RECORDS = 200_000  # bounds memory whatever the retention: ~2 KiB a record
TRIM_EVERY = 60.0  # seconds between trims, which the web process runs in the background


@dataclass(frozen=True)
class QueueEntry:
    """An arq job written together with its record: its queue, serialized job and times."""

    queue: str
    job_id: str
    payload: bytes
    score: int  # when it may run, in ms
    expires_ms: int


# One round trip accepts a job: the record, its indexes, the arq job and its queue entry appear
# together or not at all, and a delivery seen before changes nothing. KEYS and ARGV are named in the
# order `_script_call` sends them; KEYS past the named ones are the record's indexes, the first of
# them the all-jobs index.
_CREATE_QUEUED = """
local record, job, result, queue, index_names = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local body, ttl, id, received, channel, summary, payload, job_ms, score = unpack(ARGV)
if redis.call('EXISTS', record) > 0 then return 0 end
redis.call('SET', record, body, 'EX', ttl)
-- arq's job or result for this id without our record is what a failover left of a delivery the new
-- primary never got (a worker's run of it on the old primary, then "expired" here): it goes, or arq
-- would never run the job again and the delivery would count as seen.
if redis.call('EXISTS', result) > 0 then redis.call('DEL', result) end
redis.call('PSETEX', job, job_ms, payload)
redis.call('ZADD', queue, score, id)
for i = 6, #KEYS do
  redis.call('ZADD', KEYS[i], received, id)
  if i > 6 then redis.call('SADD', index_names, KEYS[i]) end
end
redis.call('PUBLISH', channel, summary)
return 1
"""

# The same without a queue entry: a record alone (tests seed records this way; accepting an event always
# queues it too, through `JobQueue.submit`).
_CREATE_RECORD = """
local record, index_names = KEYS[1], KEYS[2]
local body, ttl, id, received, channel, summary = unpack(ARGV)
if redis.call('EXISTS', record) > 0 then return 0 end
redis.call('SET', record, body, 'EX', ttl)
for i = 3, #KEYS do
  redis.call('ZADD', KEYS[i], received, id)
  if i > 3 then redis.call('SADD', index_names, KEYS[i]) end
end
redis.call('PUBLISH', channel, summary)
return 1
"""

# One command saves a record: it leaves every other state's index, joins its own indexes, and
# subscribers hear of it; atomic, and far cheaper to send than the dozen commands it replaces.
# KEYS past the named ones: every state's index (`states` of them), then the record's own indexes.
_SAVE = """
local record, all_jobs, index_names = KEYS[1], KEYS[2], KEYS[3]
local body, ttl, id, received, channel, summary, states = unpack(ARGV)
states = tonumber(states)
redis.call('SET', record, body, 'EX', ttl)
for i = 4, 3 + states do redis.call('ZREM', KEYS[i], id) end
redis.call('ZADD', all_jobs, received, id)
for i = 4 + states, #KEYS do
  redis.call('ZADD', KEYS[i], received, id)
  redis.call('SADD', index_names, KEYS[i])
end
redis.call('PUBLISH', channel, summary)
return 1
"""


def _script_call(named_keys: dict[str, Any], more_keys: list[str], named_args: dict[str, Any]) -> dict[str, Any]:
    """A script's KEYS and ARGV from names, in the order the script's first lines name them."""
    return {"keys": [*named_keys.values(), *more_keys], "args": list(named_args.values())}


def feed_channel(redis: Redis) -> str:
    """The job feed's channel; pub/sub ignores databases, so installations sharing a server are kept apart."""
    return prefixed(f"{FEED}{redis.connection_pool.connection_kwargs.get('db', 0)}")


class JobStore:
    """Job records in Redis, each expiring after the retention period, findable through indexes."""

    def __init__(self, redis: Redis, retention_seconds: float, max_records: int = MAX_RECORDS) -> None:
        self._redis = redis
        self._ttl = int(retention_seconds)
        self._max_records = max_records
        # Each sent once, then called by its hash; redis-py sends it again if a restarted Redis forgot it.
        self._create_queued = redis.register_script(_CREATE_QUEUED)
        self._create_record = redis.register_script(_CREATE_RECORD)
        self._save = redis.register_script(_SAVE)

    @classmethod
    def from_settings(cls, redis: Redis, settings: Settings) -> JobStore:
        return cls(redis, settings.job_retention_days * 86400, settings.max_job_records)

    async def create(self, record: JobRecord, entry: QueueEntry | None = None) -> bool:
        """Store a new record and, in the same atomic step, its queue entry; False when the record, or a
        queued or finished arq job with its id, exists already (nothing is written then)."""
        indexes = [prefixed(JOB_INDEX), *record.index_keys()]
        if entry is None:
            call = _script_call({"record": prefixed(JOB_KEY + record.id), "index_names": prefixed(INDEXES)},
                                indexes, self._record_args(record))
            return bool(await self._create_record(**call))
        return bool(await self._create_queued(**self._create_queued_call(record, entry)))

    async def stage_create(self, pipe: Any, record: JobRecord, entry: QueueEntry) -> None:
        """Add `create` (with a queue entry) to a pipeline; its answer there is 1, or 0 for a job seen before."""
        await self._create_queued(**self._create_queued_call(record, entry), client=pipe)

    def _create_queued_call(self, record: JobRecord, entry: QueueEntry) -> dict[str, Any]:
        return _script_call(
            {"record": prefixed(JOB_KEY + record.id), "job": job_key_prefix + entry.job_id,
             "result": result_key_prefix + entry.job_id, "queue": entry.queue, "index_names": prefixed(INDEXES)},
            [prefixed(JOB_INDEX), *record.index_keys()],
            {**self._record_args(record), "payload": entry.payload, "job_ms": entry.expires_ms, "score": entry.score})

    async def save(self, record: JobRecord) -> None:
        await self._save(**self._save_call(record))

    async def stage_save(self, pipe: Any, record: JobRecord) -> None:
        """Add the record's save to a pipeline, so a job's last writes reach Redis in one round trip."""
        await self._save(**self._save_call(record), client=pipe)

    def _record_args(self, record: JobRecord) -> dict[str, Any]:
        # Subscribers see each transition in the order the saves happen.
        return {"body": record.model_dump_json(), "ttl": self._ttl, "id": record.id, "received": record.received_at,
                "channel": feed_channel(self._redis), "summary": orjson.dumps(record.summary())}

    def _save_call(self, record: JobRecord) -> dict[str, Any]:
        states = [prefixed(f"{INDEX_PREFIX}state:{state.value}") for state in JobState]
        return _script_call(
            {"record": prefixed(JOB_KEY + record.id), "all_jobs": prefixed(JOB_INDEX), "index_names": prefixed(INDEXES)},
            [*states, *record.index_keys()], {**self._record_args(record), "states": len(states)})

    async def get(self, job_id: str) -> JobRecord | None:
        raw = await self._redis.get(prefixed(JOB_KEY + job_id))
        return JobRecord.model_validate_json(raw) if raw else None

    async def list(self, query: JobQuery, limit: int = 50, cursor: Cursor | None = None) -> JobPage:
        """Matching records, newest first, and the cursor of the next page (None on the last page)."""
        found: builtins.list[JobRecord] = []
        top = cursor.score if cursor else (query.until if query.until is not None else "+inf")
        bottom = query.since if query.since is not None else "-inf"
        batch, offset = max(2 * limit, 100), 0
        while len(found) <= limit:
            entries = await self._redis.zrevrangebyscore(query.index_key(), top, bottom, start=offset, num=batch,
                                                         withscores=True)
            offset += len(entries)
            ids = [job_id.decode() for job_id, score in entries
                   if cursor is None or cursor.passed(score, job_id.decode())]
            found += [r for r in await self._load(ids) if query.matches(r)]
            if len(entries) < batch:
                break
        page = found[:limit]
        more = len(found) > limit
        return JobPage(page, Cursor(page[-1].received_at, page[-1].id).encode() if more else None)

    async def get_many(self, ids: builtins.list[str]) -> builtins.list[JobRecord | None]:
        """The records of these ids, in their order (None where there is none), in one round trip."""
        if not ids:
            return []
        raws = await self._redis.mget([prefixed(JOB_KEY + job_id) for job_id in ids])
        return [JobRecord.model_validate_json(raw) if raw else None for raw in raws]

    async def _load(self, ids: builtins.list[str]) -> builtins.list[JobRecord]:
        if not ids:
            return []
        raws = await self._redis.mget([prefixed(JOB_KEY + job_id) for job_id in ids])
        return [JobRecord.model_validate_json(raw) for raw in raws if raw]

    async def counts(self) -> dict[str, int]:
        """How many records are in each state."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for state in JobState:
                pipe.zcard(prefixed(f"{INDEX_PREFIX}state:{state.value}"))
            sizes = await pipe.execute()
        return {state.value: int(size) for state, size in zip(JobState, sizes)}

    async def trim(self, now: float | None = None) -> int:
        """Forget records past the retention period, and the oldest beyond the record cap; returns how many."""
        now = time.time() if now is None else now
        cutoff = now - self._ttl
        job_index, all_indexes = prefixed(JOB_INDEX), prefixed(INDEXES)
        excess = await self._redis.zcard(job_index) - self._max_records
        if excess > 0:
            oldest = await self._redis.zrange(job_index, excess - 1, excess - 1, withscores=True)
            cutoff = max(cutoff, oldest[0][1])
        ids = await self._redis.zrangebyscore(job_index, "-inf", cutoff)
        indexes = [key.decode() for key in await awaited(self._redis.smembers(all_indexes))]
        async with self._redis.pipeline(transaction=False) as pipe:
            for start in range(0, len(ids), 1000):
                pipe.delete(*(prefixed(JOB_KEY + job_id.decode()) for job_id in ids[start:start + 1000]))
            for key in (job_index, *indexes):
                pipe.zremrangebyscore(key, "-inf", cutoff)
            await pipe.execute()
        # An index emptied by trimming no longer exists; stop listing it.
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in indexes:
                pipe.exists(key)
            gone = [key for key, exists in zip(indexes, await pipe.execute()) if not exists]
        if gone:
            await awaited(self._redis.srem(all_indexes, *gone))
        return len(ids)
