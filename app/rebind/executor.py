"""Carrying out a BindingPlan: bind first, move, unbind last, and only what is still missing."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.bitrix.client import BATCH_LIMIT, Command, CommandResult, RestClient
from app.bitrix.errors import B24Error, ConfigError, MethodBlocked, Policy, TransientError, policy_for
from app.rebind.facts import TYPE_BY_NAME, TYPE_NAMES
from app.rules.facts import Binding, bindings_json
from app.rules.plan import BindingPlan, ItemPlan

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    kind: str  # activity | comment
    id: int
    before: list[Binding]
    after: list[Binding]
    status: str  # changed | dry_run | failed | gone (the activity or comment was deleted since it was read)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def as_record(self) -> dict[str, Any]:
        return {self.kind: self.id, "before": bindings_json(self.before), "after": bindings_json(self.after),
                "status": self.status,
                "errors": self.errors}


Step = tuple[str, int, Command]  # (kind, id, command)
WRITE_ATTEMPTS = 4  # per batch of writes; then the whole job retries later


class TargetsGone(Exception):
    """Records the plan would bind to no longer exist; nothing was written. Plan again without them."""

    def __init__(self, targets: set[Binding]) -> None:
        self.targets = targets
        super().__init__(", ".join(sorted(str(t) for t in targets)) + " no longer exist(s) in the portal")


async def execute(plan: BindingPlan, client: RestClient) -> list[Outcome]:
    """Apply a plan. All binds go first; an item loses a binding only once its binds succeeded.

    A portal accepts a binding to a record that does not exist, so every record the plan binds to is
    read first (at the head of the halting write batch when the plan fits in one): a missing one stops
    everything before a write, and TargetsGone is raised.

    Raises TransientError (the job retries and re-reads first) or ConfigError (a person must act).
    """
    items: list[tuple[str, int, ItemPlan]] = [("activity", a.activity_id, a) for a in plan.activities
                                              if a.changes and not a.dry_run]
    items += [("comment", c.comment_id, c) for c in plan.comments if c.changes and not c.dry_run]
    failed: dict[tuple[str, int], list[B24Error]] = {}
    phases = [[step for kind, id_, item in items for step in phase(kind, id_, item)]
              for phase in (_binds, _moves, _unbinds)]
    checks = _target_checks(items)
    left = await _in_one_request(client, phases, failed, checks)
    if left is None and checks:
        _raise_gone(checks, await client.batch([command for _, command in checks]))
    for phase in phases:
        steps = phase if left is None else [step for step in phase if step in left]
        await _write(client, [step for step in steps if step[:2] not in failed], failed)
    outcomes = [_outcome("activity", a.activity_id, a, failed.get(("activity", a.activity_id)))
                for a in plan.activities if a.changes]
    return outcomes + [_outcome("comment", c.comment_id, c, failed.get(("comment", c.comment_id)))
                       for c in plan.comments if c.changes]


def _target_checks(items: list[tuple[str, int, ItemPlan]]) -> list[tuple[Binding, Command]]:
    """A read of each record the plan binds or moves something to."""
    targets = {b for _, _, item in items for b in item.add} | {t for _, _, item in items for _, t in item.moves}
    return [(t, Command(f"crm.{TYPE_NAMES[t.entity_type]}.get", {"id": t.entity_id}))
            for t in sorted(targets, key=lambda b: (int(b.entity_type), b.entity_id)) if t.entity_type in TYPE_NAMES]


def _raise_gone(checks: list[tuple[Binding, Command]], results: Sequence[CommandResult]) -> None:
    """Other errors of a check (no rights on the record) are left to the write, which reports them."""
    gone = {target for (target, _), result in zip(checks, results)
            if result.error is not None and result.error.code == "NOT_FOUND"}
    if gone:
        raise TargetsGone(gone)


def _binds(kind: str, id_: int, item: ItemPlan) -> list[Step]:
    if kind == "comment":
        return [(kind, id_, _comment_command("crm.timeline.bindings.bind", id_, b)) for b in item.add]
    return [(kind, id_, _binding_command("crm.activity.binding.add", id_, b)) for b in item.add]


def _moves(kind: str, id_: int, item: ItemPlan) -> list[Step]:
    return [(kind, id_, Command("crm.activity.binding.move", {
        "activityId": id_, "sourceEntityTypeId": int(source.entity_type), "sourceEntityId": source.entity_id,
        "targetEntityTypeId": int(target.entity_type), "targetEntityId": target.entity_id}))
        for source, target in item.moves]


def _unbinds(kind: str, id_: int, item: ItemPlan) -> list[Step]:
    if kind == "comment":
        return [(kind, id_, _comment_command("crm.timeline.bindings.unbind", id_, b)) for b in item.remove]
    return [(kind, id_, _binding_command("crm.activity.binding.delete", id_, b)) for b in item.remove]


def _binding_command(method: str, activity_id: int, binding: Binding) -> Command:
    return Command(method, {"activityId": activity_id, "entityTypeId": int(binding.entity_type),
                            "entityId": binding.entity_id})


def _comment_command(method: str, comment_id: int, binding: Binding) -> Command:
    return Command(method, {"fields": {"OWNER_ID": comment_id, "ENTITY_ID": binding.entity_id,
                                       "ENTITY_TYPE": TYPE_NAMES[binding.entity_type]}})


async def _in_one_request(client: RestClient, phases: list[list[Step]],
                          failed: dict[tuple[str, int], list[B24Error]],
                          checks: list[tuple[Binding, Command]]) -> list[Step] | None:
    """Send a small plan's binds, moves and unbinds in one batch that halts at the first error; return
    the steps left to do phase by phase (None: not tried, all of them).

    Sub-calls run in order, so nothing is unbound unless every bind before it succeeded: the same
    guarantee as a request per phase, for one request instead of two or three (at 2 requests a
    second, that is most of a single-activity job's cost).
    """
    steps = [step for phase in phases for step in phase]
    if sum(1 for phase in phases if phase) < 2 or len(steps) + len(checks) > BATCH_LIMIT:
        return None  # one phase is one request anyway, and without halting others' items keep going
    try:
        results = await client.batch([command for _, command in checks] + [command for _, _, command in steps],
                                     write=True, halt=True)
    except TransientError as exc:
        if isinstance(exc, MethodBlocked):
            raise
        await asyncio.sleep(0.5)
        return await _still_needed(client, steps)  # the writes may or may not have landed: look first
    _raise_gone(checks, results[:len(checks)])  # a target missing halted the batch before any write
    results = results[len(checks):]
    for position, (step, result) in enumerate(zip(steps, results)):
        if result.error is not None and result.error.code == "NOT_RUN":
            return steps[position:]  # the batch halted before it
        error = _failure(result)
        if error is not None:
            failed.setdefault(step[:2], []).append(error)
    return []


async def _write(client: RestClient, steps: Sequence[Step], failed: dict[tuple[str, int], list[B24Error]]) -> None:
    for attempt in range(WRITE_ATTEMPTS):
        if not steps:
            return
        try:
            results = await client.batch([command for _, _, command in steps], write=True)
            break
        except TransientError as exc:
            # The writes may or may not have landed: look, then send only what is still missing.
            if isinstance(exc, MethodBlocked) or attempt + 1 == WRITE_ATTEMPTS:
                raise
            await asyncio.sleep(0.5 * 2**attempt)
            steps = await _still_needed(client, steps)
    else:
        return
    for (kind, id_, _), result in zip(steps, results):
        error = _failure(result)
        if error is not None:
            failed.setdefault((kind, id_), []).append(error)


async def current_bindings(client: RestClient, items: Sequence[tuple[str, int]]) -> list[list[Binding]]:
    """The bindings each (kind, id) has now, in one batch; a read that fails raises its error."""
    reads = [Command("crm.activity.binding.list", {"activityId": id_}) if kind == "activity"
             else Command("crm.timeline.bindings.list", {"filter": {"OWNER_ID": id_}}) for kind, id_ in items]
    current = []
    for (kind, _), result in zip(items, await client.batch(reads)):
        if result.error:
            raise result.error
        rows = result.result or []
        current.append([Binding(entity_type=int(b["entityTypeId"]), entity_id=int(b["entityId"])) for b in rows]
                       if kind == "activity" else
                       [Binding(entity_type=int(TYPE_BY_NAME.get(str(b["ENTITY_TYPE"]).lower(), 0)),
                                entity_id=int(b["ENTITY_ID"])) for b in rows])
    return current


async def _still_needed(client: RestClient, steps: Sequence[Step]) -> list[Step]:
    """Re-read the bindings of the items these steps touch and keep the steps not yet done."""
    items = sorted({(kind, id_) for kind, id_, _ in steps})
    current = {item: {(int(b.entity_type), b.entity_id) for b in bindings}
               for item, bindings in zip(items, await current_bindings(client, items))}
    return [step for step in steps if not _done(step, current[(step[0], step[1])])]


def _done(step: Step, bindings: set[tuple[int, int]]) -> bool:
    _, _, command = step
    p = command.params
    if command.method == "crm.activity.binding.move":
        return (p["targetEntityTypeId"], p["targetEntityId"]) in bindings
    if command.method.startswith("crm.timeline."):
        pair = (int(TYPE_BY_NAME[p["fields"]["ENTITY_TYPE"]]), p["fields"]["ENTITY_ID"])
        return (pair in bindings) == command.method.endswith(".bind")
    pair = (p["entityTypeId"], p["entityId"])
    return (pair in bindings) == command.method.endswith(".add")


def _failure(result: CommandResult) -> B24Error | None:
    """The error that counts as a failure; 'already bound' and 'not bound any more' count as done."""
    error = result.error
    if error is None or policy_for(error.code).policy == Policy.DONE:
        return None
    if isinstance(error, (TransientError, ConfigError)):
        raise error
    return error


def _outcome(kind: str, id_: int, item: ItemPlan, errors: list[B24Error] | None) -> Outcome:
    # A binding write answering NOT_FOUND ("Element not found") means the activity itself is gone.
    gone = bool(errors) and all(e.code == "NOT_FOUND" for e in errors or [])
    status = "dry_run" if item.dry_run else "gone" if gone else "failed" if errors else "changed"
    after = item.before if errors else item.after  # a dry run's is what it would have been
    return Outcome(kind, id_, list(item.before), list(after), status,
                   [e.as_record() for e in errors or []])
