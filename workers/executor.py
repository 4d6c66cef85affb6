"""Carrying out a BindingPlan: bind first, unbind last, and only what is still missing."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from app.bitrix.client import Command, CommandResult, RestClient
from app.bitrix.errors import B24Error, ConfigError, Policy, TransientError, policy_for
from app.rules.facts import Binding
from app.rules.plan import ActivityPlan, BindingPlan

log = logging.getLogger(__name__)


@dataclass
class ActivityOutcome:
    activity_id: int
    before: list[str]
    after: list[str]
    status: str  # changed | unchanged | dry_run | failed
    errors: list[dict[str, Any]] = field(default_factory=list)

    def as_record(self) -> dict[str, Any]:
        return {"activity": self.activity_id, "before": self.before, "after": self.after, "status": self.status,
                "errors": self.errors}


async def execute(plan: BindingPlan, client: RestClient) -> list[ActivityOutcome]:
    """Apply a plan. The adds all go first; an activity loses its lead only once its adds succeeded.

    Raises TransientError (the job retries and re-reads first) or ConfigError (a person must act).
    """
    todo = [a for a in plan.activities if a.changes and not a.dry_run]
    failed: dict[int, list[B24Error]] = {}
    await _write(client, "crm.activity.binding.add", [(a, b) for a in todo for b in a.add], failed)
    await _write(client, "crm.activity.binding.delete",
                 [(a, b) for a in todo if a.activity_id not in failed for b in a.remove], failed)
    return [_outcome(a, failed.get(a.activity_id)) for a in plan.activities if a.changes]


async def _write(client: RestClient, method: str, steps: list[tuple[ActivityPlan, Binding]],
                 failed: dict[int, list[B24Error]]) -> None:
    if not steps:
        return
    commands = [Command(method, {"activityId": a.activity_id, "entityTypeId": int(b.entity_type),
                                 "entityId": b.entity_id}) for a, b in steps]
    results = await client.batch(commands, write=True)
    for (activity, _), result in zip(steps, results):
        error = _failure(result)
        if error is not None:
            failed.setdefault(activity.activity_id, []).append(error)


def _failure(result: CommandResult) -> B24Error | None:
    """The error that counts as a failure; 'already bound' and 'not bound any more' count as done."""
    error = result.error
    if error is None or policy_for(error.code).policy == Policy.DONE:
        return None
    if isinstance(error, (TransientError, ConfigError)):
        raise error
    return error


def _outcome(activity: ActivityPlan, errors: list[B24Error] | None) -> ActivityOutcome:
    status = "dry_run" if activity.dry_run else "failed" if errors else "changed"
    after = activity.before if activity.dry_run or errors else activity.after
    return ActivityOutcome(activity.activity_id, [str(b) for b in activity.before], [str(b) for b in after],
                           status, [e.as_record() for e in errors or []])
