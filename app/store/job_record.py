"""A job record: what happened to one accepted event, its states, its attempts, and where it lives in Redis.

arq's own results expire and hold only a return value; a record holds the state, the plan, every
change and every attempt, and outlives the queue entry for the retention period. The store that
keeps records is `app.store.jobs`; the filters and pages of a job list are `app.store.job_query`.
"""
from __future__ import annotations

import hashlib
import re
import time
from enum import Enum
from typing import Any

from pydantic import BaseModel, Field, field_validator

from app.crm import Binding
from app.store.namespace import prefixed

JOB_KEY = "b24:job:"
JOB_INDEX = "b24:jobs"  # sorted set: job id by time received
INDEX_PREFIX = "b24:jobs:"  # sorted sets per state, portal, event, rule and trigger, also by time received


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
