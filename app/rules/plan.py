"""BindingPlan: what a job wants each activity's bindings to be, and why."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from app.rules.facts import Binding, bindings_json


class ItemPlan(BaseModel):
    """Bindings before and after for one activity or timeline comment."""

    model_config = ConfigDict(frozen=True)

    before: tuple[Binding, ...]
    after: tuple[Binding, ...]
    moves: tuple[tuple[Binding, Binding], ...] = ()
    rules: tuple[str, ...] = ()
    dry_run: bool = False
    notes: tuple[str, ...] = ()

    @property
    def add(self) -> list[Binding]:
        moved_to = {target for _, target in self.moves}
        return [b for b in self.after if b not in self.before and b not in moved_to]

    @property
    def remove(self) -> list[Binding]:
        moved_from = {source for source, _ in self.moves}
        return [b for b in self.before if b not in self.after and b not in moved_from]

    @property
    def changes(self) -> bool:
        return set(self.before) != set(self.after)

    def describe(self) -> dict[str, object]:
        return {"before": bindings_json(self.before), "after": bindings_json(self.after),
                "add": bindings_json(self.add), "remove": bindings_json(self.remove),
                "move": [{"from": s.as_json(), "to": t.as_json()} for s, t in self.moves], "rules": list(self.rules),
                "dry_run": self.dry_run, "notes": list(self.notes)}


class ActivityPlan(ItemPlan):
    activity_id: int
    bindings_read: bool = True  # the activity's `bindings_read`: False when `before` was assumed


class CommentPlan(ItemPlan):
    comment_id: int


class BindingPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    activities: tuple[ActivityPlan, ...] = ()
    comments: tuple[CommentPlan, ...] = ()
    matched_rules: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not any(item.changes for item in (*self.activities, *self.comments))

    def summary(self) -> list[dict[str, object]]:
        """The plan as a job record shows it: before and after per activity and comment."""
        return ([{"activity": a.activity_id, **a.describe()} for a in self.activities]
                + [{"comment": c.comment_id, **c.describe()} for c in self.comments])
