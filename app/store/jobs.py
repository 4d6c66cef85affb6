"""Job records: what happened to each accepted event, kept in Redis for people to read.

arq's own results expire and hold only a return value; these records hold the state, the plan,
every change and every attempt, and outlive the queue entry for the retention period.
"""
from __future__ import annotations

import base64
import builtins
import hashlib
import math
import re
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson
from arq.constants import job_key_prefix, result_key_prefix
from pydantic import BaseModel, Field, field_validator
from redis.asyncio import Redis

from app.crm import Binding, EntityType
from app.settings import Settings
from app.store.namespace import prefixed
from app.store.redis_typing import awaited

JOB_KEY = "b24:job:"
JOB_INDEX = "b24:jobs"  # sorted set: job id by time received
INDEX_PREFIX = "b24:jobs:"  # sorted sets per state, portal, event, rule and trigger, also by time received
INDEXES = "b24:jobs:indexes"  # the names of those sorted sets, for trimming
FEED = "b24:jobs:feed:"  # + db number: pub/sub channel with a job's summary at each transition
MAX_RECORDS = 200_000  # bounds memory whatever the retention: ~2 KiB a record
TRIM_EVERY = 60.0  # seconds between trims, which the web process runs in the background


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    SKIPPED = "skipped"
    RETRYING = "retrying"
    FAILED = "failed"
    DEAD = "dead"  # a passing failure that outlasted every retry: a dead letter, to replay
    UNDONE = "undone"  # succeeded, then its changes were restored by an undo


FINAL_STATES = (JobState.SUCCEEDED, JobState.SKIPPED, JobState.FAILED, JobState.DEAD, JobState.UNDONE)


class UnknownJob(LookupError):
    """No record of that job id: never accepted, or past the retention period."""

    def __init__(self, job_id: str, retention_days: float) -> None:
        super().__init__(f"no job {job_id[:64]!r}: no such id was accepted in the last {retention_days:g} days "
                         "(job records are kept that long); `b24rebind jobs list` shows the ids")


class Attempt(BaseModel):
    number: int
    started_at: float
    finished_at: float | None = None
    outcome: str = "running"
    error: dict[str, Any] | None = None


class JobRecord(BaseModel):
    id: str
    state: JobState = JobState.QUEUED
    portal: str
    event: str
    entity_id: int
    event_ts: str = ""
    trigger: str = "webhook"  # webhook | backfill | retry
    only_rule: str | None = None  # backfill --rule
    dry_run: bool = False  # backfill --dry-run
    lead_id: int | None = None  # the lead the work is about, once known (saves a read on each retry)
    lead_version: str = ""  # the lead's DATE_MODIFY as the job last read it (the reconcile sweep compares)
    received_at: float = Field(default_factory=time.time)
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    rules: list[str] = []
    plan: list[dict[str, Any]] = []
    changes: list[dict[str, Any]] = []
    error: dict[str, Any] | None = None
    outcome: str = ""
    attempts: list[Attempt] = []
    requests: int = 0
    payload: dict[str, Any] | None = None  # the event as the portal sent it, tokens masked (intake)

    @field_validator("plan", "changes")
    @classmethod
    def _bindings_as_values(cls, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Records written before bindings were values hold them as text ("contact 42"): read them in
        today's shape, so that every reader, the API's clients too, sees one."""
        return [_item_as_values(item) if _has_text(item) else item for item in items]

    @classmethod
    def for_event(cls, portal: str, event: str, entity_id: int, event_ts: str, handler_id: str = "") -> JobRecord:
        # The same delivery always gets the same id, so a duplicate delivery finds its first job. The key
        # prefix goes in too: installations sharing a Redis share arq's per-job keys (`arq:job:<id>`).
        delivery = prefixed(f"{portal}|{event}|{entity_id}|{event_ts}|{handler_id}")
        digest = hashlib.sha256(delivery.encode()).hexdigest()
        return cls(id=digest[:24], portal=portal, event=event, entity_id=entity_id, event_ts=event_ts)

    def task_args(self) -> dict[str, Any]:
        """What the queue carries: enough to rebuild the record if it was lost."""
        return {"job_id": self.id, "portal": self.portal, "event": self.event, "entity_id": self.entity_id,
                "event_ts": self.event_ts, "trigger": self.trigger, "only_rule": self.only_rule,
                "dry_run": self.dry_run}

    @property
    def failures(self) -> int:
        """Attempts that failed for a passing reason; waiting for a lock or a time budget does not count."""
        return sum(1 for attempt in self.attempts if attempt.outcome in ("retrying", "crashed"))

    def begin_attempt(self, tries: int = 1) -> None:
        """`tries`: the queue's count of this job's runs. A retry by hand starts that count again, and a run
        whose record was never saved is in it but not in the record: the number is the larger of the two."""
        now = time.time()
        last = self.attempts[-1] if self.attempts else None
        if last is not None and last.finished_at is None:  # its worker was killed, or lost Redis, mid-way
            last.outcome, last.finished_at = "interrupted", now
        self.state = JobState.RUNNING
        self.started_at = self.started_at or now
        last_number = self.attempts[-1].number if self.attempts else 0
        self.attempts.append(Attempt(number=max(tries, last_number + 1), started_at=now))

    def end_attempt(self, state: JobState, outcome: str, error: dict[str, Any] | None = None,
                    attempt_outcome: str | None = None) -> None:
        now = time.time()
        self.state, self.outcome, self.error = state, outcome, error
        if self.attempts:
            attempt = self.attempts[-1]
            attempt.finished_at, attempt.outcome, attempt.error = now, attempt_outcome or state.value, error
            if attempt.outcome == "deferred" and len(self.attempts) > 1 and self.attempts[-2].outcome == "deferred":
                del self.attempts[-2]  # a run of waits is kept as its latest: a long wait is not 300 attempts
        if state in FINAL_STATES:
            self.finished_at = now

    def mark_undone(self, restored: int) -> None:
        """The job's changes were restored: its state says so, and what will happen next."""
        self.state = JobState.UNDONE
        self.outcome = f"undone: {restored} {'item' if restored == 1 else 'items'} restored. " + reapply_note(self.rules)

    def give_up(self, outcome: str, error: dict[str, Any]) -> None:
        """The queue gave up on the job between attempts: it is dead, and says why."""
        self.state, self.outcome, self.error, self.finished_at = JobState.DEAD, outcome, error, time.time()

    def summary(self) -> dict[str, Any]:
        """The record without its plan and changes: what job lists and live updates carry."""
        error = self.error or {}
        return {"id": self.id, "state": self.state.value, "portal": self.portal, "event": self.event,
                "entity_id": self.entity_id, "trigger": self.trigger, "rules": self.rules,
                "received_at": self.received_at, "started_at": self.started_at, "finished_at": self.finished_at,
                "outcome": self.outcome, "attempts": len(self.attempts), "requests": self.requests,
                "changes": len(self.changes), "error": {k: error.get(k) for k in ("code", "description",
                                                                                   "what_to_do")} if error else None}

    def index_keys(self) -> list[str]:
        """The sorted sets that find this record by state, portal, event, trigger and rule."""
        names = [f"{INDEX_PREFIX}state:{self.state.value}", f"{INDEX_PREFIX}portal:{self.portal}",
                 f"{INDEX_PREFIX}event:{self.event}", f"{INDEX_PREFIX}trigger:{self.trigger}",
                 *(f"{INDEX_PREFIX}rule:{rule}" for rule in self.rules)]
        return [prefixed(name) for name in names]


_JOB_ID = re.compile(r"[A-Za-z0-9]{1,64}")


def is_job_id(text: str) -> bool:
    """Job ids are digests (and `undo` + one): ASCII letters and digits only, never `¹` or `٣`, which
    str.isalnum() lets through."""
    return _JOB_ID.fullmatch(text) is not None


_BINDING_LISTS = ("before", "after", "add", "remove")


def _has_text(item: dict[str, Any]) -> bool:
    return any(isinstance(b, str) for key in (*_BINDING_LISTS, "move") for b in item.get(key) or ())


def _item_as_values(item: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, list[Any]] = {key: [Binding.read(b).as_json() for b in item[key]]
                                    for key in _BINDING_LISTS if key in item}
    if "move" in item:  # "company 1 -> company 2"
        values["move"] = [{"from": Binding.parse(m.split(" -> ")[0]).as_json(),
                           "to": Binding.parse(m.split(" -> ")[1]).as_json()} if isinstance(m, str) else m
                          for m in item["move"]]
    return {**item, **values}


def reapply_note(rules: list[str]) -> str:
    """What an undo does not stop: the rules still hold, and the next event or reconcile applies them."""
    names = ", ".join(repr(name) for name in rules) or "that made the change"
    return (f"The rules apply again on the next event about these items or at the next reconcile, unless you "
            f"pause the rule {names} (enabled: false in the rules file).")


class JobQuery(BaseModel):
    """Filters for a job list; each is optional, all given ones must hold. Times are Unix seconds."""

    state: JobState | None = None
    portal: str | None = None
    event: str | None = None
    rule: str | None = None
    trigger: str | None = None
    entity: int | None = None
    lead: int | None = None  # the lead a job was about: its own events and its activities'
    since: float | None = None
    until: float | None = None

    def matches(self, record: JobRecord) -> bool:
        return ((self.state is None or record.state == self.state)
                and (self.portal is None or record.portal == self.portal)
                and (self.event is None or record.event == self.event)
                and (self.rule is None or self.rule in record.rules)
                and (self.trigger is None or record.trigger == self.trigger)
                and (self.entity is None or record.entity_id == self.entity)
                and (self.lead is None or _about_lead(record, self.lead))
                and (self.since is None or record.received_at >= self.since)
                and (self.until is None or record.received_at <= self.until))

    def index_key(self) -> str:
        """The smallest sorted set known to hold every match: states are the usual filter."""
        for name in ("state", "rule", "event", "portal", "trigger"):
            value = getattr(self, name)
            if value is not None:
                value = value.value if isinstance(value, JobState) else value
                return prefixed(f"{INDEX_PREFIX}{name}:{value}")
        return prefixed(JOB_INDEX)


def _about_lead(record: JobRecord, lead: int) -> bool:
    """The lead's own events, the jobs that worked on it, and those whose activities were bound to it."""
    if record.lead_id == lead or (record.entity_id == lead and record.event.startswith("ONCRMLEAD")):
        return True
    binding = Binding(entity_type=EntityType.LEAD, entity_id=lead).as_json()
    return any(binding in item.get("before", ()) for item in record.plan)


@dataclass(frozen=True)
class Cursor:
    """Where a page ended: the last job's time received and id (ties in time are ordered by id)."""

    score: float
    job_id: str

    def encode(self) -> str:
        return base64.urlsafe_b64encode(f"{self.score!r}|{self.job_id}".encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """Raises ValueError for anything that is not a cursor this store made."""
        try:
            score, job_id = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode().split("|", 1)
            cursor = cls(float(score), job_id)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError("not a cursor from a previous page") from exc
        if not math.isfinite(cursor.score) or not job_id.isalnum():
            raise ValueError("not a cursor from a previous page")
        return cursor

    def passed(self, score: float, job_id: str) -> bool:
        """Whether an entry comes after the cursor, newest first (Redis orders equal scores by id)."""
        return score < self.score or (score == self.score and job_id < self.job_id)


@dataclass(frozen=True)
class JobPage:
    records: list[JobRecord]
    next_cursor: str | None


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
