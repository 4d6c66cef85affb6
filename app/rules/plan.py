"""BindingPlan: what a job wants each activity's bindings to be, and why."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from app.rules.facts import Binding


class ActivityPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    activity_id: int
    before: tuple[Binding, ...]
    after: tuple[Binding, ...]
    rules: tuple[str, ...] = ()
    dry_run: bool = False
    notes: tuple[str, ...] = ()

    @property
    def add(self) -> list[Binding]:
        return [b for b in self.after if b not in self.before]

    @property
    def remove(self) -> list[Binding]:
        return [b for b in self.before if b not in self.after]

    @property
    def changes(self) -> bool:
        return bool(self.add or self.remove)


class BindingPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    activities: tuple[ActivityPlan, ...] = ()
    matched_rules: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not any(a.changes for a in self.activities)

    def summary(self) -> list[dict[str, object]]:
        """The plan as a job record shows it: before and after per activity."""
        return [
            {"activity": a.activity_id, "before": [str(b) for b in a.before], "after": [str(b) for b in a.after],
             "add": [str(b) for b in a.add], "remove": [str(b) for b in a.remove], "rules": list(a.rules),
             "dry_run": a.dry_run, "notes": list(a.notes)}
            for a in self.activities
        ]
