"""What became of each item of a plan: its bindings before and after, and why, for the job's record
(and for an undo, which restores `before`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.bitrix.errors import POLICIES, B24Error, PermanentError
from app.rebind.binding_steps import Found, Item
from app.rules.facts import Binding, bindings_json
from app.rules.plan import BindingPlan, ItemPlan


@dataclass
class Outcome:
    kind: str  # activity | comment
    id: int
    before: list[Binding]
    after: list[Binding]
    # changed | dry_run | failed | gone (the activity or comment was deleted since it was read) | kept (the
    # plan would take it past 100 bindings, which the portal trims without a word: left as found)
    status: str
    errors: list[dict[str, Any]] = field(default_factory=list)

    def as_record(self) -> dict[str, Any]:
        return {self.kind: self.id, "before": bindings_json(self.before), "after": bindings_json(self.after),
                "status": self.status,
                "errors": self.errors}


def outcomes(plan: BindingPlan, failed: dict[Item, list[B24Error]], found: Found, kept: set[Item]) -> list[Outcome]:
    outcomes = [_outcome("activity", a.activity_id, a, failed.get(("activity", a.activity_id)),
                         found.get(("activity", a.activity_id)), ("activity", a.activity_id) in kept)
                for a in plan.activities if a.changes]
    return outcomes + [_outcome("comment", c.comment_id, c, failed.get(("comment", c.comment_id)),
                                found.get(("comment", c.comment_id)), ("comment", c.comment_id) in kept)
                       for c in plan.comments if c.changes]


def _outcome(kind: str, id_: int, item: ItemPlan, errors: list[B24Error] | None,
             found: list[Binding] | None = None, kept: bool = False) -> Outcome:
    # A binding write answering NOT_FOUND ("Element not found") means the activity itself is gone.
    gone = bool(errors) and all(e.code == "NOT_FOUND" for e in errors or [])
    status = "dry_run" if item.dry_run else "kept" if kept else "gone" if gone else "failed" if errors else "changed"
    before = [*item.before, *(b for b in dict.fromkeys(found or []) if b not in item.before)]
    # What it has now: the plan's after, with the bindings the plan did not know of kept.
    after = before if errors is not None or kept else [
        *(b for b in item.after if b in item.before or b not in before), *(b for b in before if b not in item.before
                                                                            and b not in item.remove)]
    if kept:
        errors = [PermanentError("crm.activity.binding.add", "BINDINGS_FULL",
                                 f"{len(before)} bindings, and the plan adds {len(item.add)}",
                                 hint=POLICIES["BINDINGS_FULL"].hint)]
    return Outcome(kind, id_, before, list(after), status, [e.as_record() for e in errors or []])
