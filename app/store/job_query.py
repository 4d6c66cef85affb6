"""A job list's filters (`JobQuery`) and pages (`Cursor`, `JobPage`): what `JobStore.list` takes and gives."""
from __future__ import annotations

import base64
import math
from dataclasses import dataclass

from pydantic import BaseModel

from app.crm import Binding, EntityType
from app.store.job_record import INDEX_PREFIX, JOB_INDEX, JobRecord, JobState
from app.store.namespace import prefixed


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
