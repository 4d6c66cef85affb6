"""Job records: what happened to each accepted event, kept in Redis for people to read.

arq's own results expire and hold only a return value; these records hold the state, the plan,
every change and every attempt, and outlive the queue entry for the retention period.
"""
from __future__ import annotations

import hashlib
import time
from enum import Enum
from typing import Any

from pydantic import BaseModel, Field
from redis.asyncio import Redis

JOB_KEY = "b24:job:"
JOB_INDEX = "b24:jobs"  # sorted set: job id by time received


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    SKIPPED = "skipped"
    RETRYING = "retrying"
    FAILED = "failed"


FINAL_STATES = (JobState.SUCCEEDED, JobState.SKIPPED, JobState.FAILED)


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

    @classmethod
    def for_event(cls, portal: str, event: str, entity_id: int, event_ts: str, handler_id: str = "") -> JobRecord:
        # The same delivery always gets the same id, so a duplicate delivery finds its first job.
        digest = hashlib.sha256(f"{portal}|{event}|{entity_id}|{event_ts}|{handler_id}".encode()).hexdigest()
        return cls(id=digest[:24], portal=portal, event=event, entity_id=entity_id, event_ts=event_ts)

    def task_args(self) -> dict[str, Any]:
        """What the queue carries: enough to rebuild the record if it was lost."""
        return {"job_id": self.id, "portal": self.portal, "event": self.event, "entity_id": self.entity_id,
                "event_ts": self.event_ts, "trigger": self.trigger, "only_rule": self.only_rule,
                "dry_run": self.dry_run}

    def begin_attempt(self, number: int) -> None:
        now = time.time()
        self.state = JobState.RUNNING
        self.started_at = self.started_at or now
        self.attempts.append(Attempt(number=number, started_at=now))

    def end_attempt(self, state: JobState, outcome: str, error: dict[str, Any] | None = None) -> None:
        now = time.time()
        self.state, self.outcome, self.error = state, outcome, error
        if self.attempts:
            attempt = self.attempts[-1]
            attempt.finished_at, attempt.outcome, attempt.error = now, state.value, error
        if state in FINAL_STATES:
            self.finished_at = now


class JobStore:
    """Job records in Redis, each expiring after the retention period."""

    def __init__(self, redis: Redis, retention_seconds: float) -> None:
        self._redis = redis
        self._ttl = int(retention_seconds)

    async def create(self, record: JobRecord) -> bool:
        """Store a new record; False when one with this id already exists."""
        created = await self._redis.set(JOB_KEY + record.id, record.model_dump_json(), nx=True, ex=self._ttl)
        if created:
            await self._redis.zadd(JOB_INDEX, {record.id: record.received_at})
        return bool(created)

    async def save(self, record: JobRecord) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(JOB_KEY + record.id, record.model_dump_json(), ex=self._ttl)
            pipe.zadd(JOB_INDEX, {record.id: record.received_at})
            await pipe.execute()

    async def get(self, job_id: str) -> JobRecord | None:
        raw = await self._redis.get(JOB_KEY + job_id)
        return JobRecord.model_validate_json(raw) if raw else None
