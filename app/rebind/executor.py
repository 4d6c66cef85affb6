"""Carrying out a BindingPlan: bind first, move, unbind last, and only what is still missing."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.bitrix.client import BATCH_LIMIT, Command, CommandResult, RestClient
from app.bitrix.errors import B24Error, ConfigError, MethodBlocked, Policy, TransientError, policy_for
from app.bitrix.session import stops_group
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
    # changed | dry_run | failed | gone (the activity or comment was deleted since it was read) | kept (the
    # portal refused a binding past its 100: the item was left as it was found)
    status: str
    errors: list[dict[str, Any]] = field(default_factory=list)

    def as_record(self) -> dict[str, Any]:
        return {self.kind: self.id, "before": bindings_json(self.before), "after": bindings_json(self.after),
                "status": self.status,
                "errors": self.errors}


Step = tuple[str, int, Command]  # (kind, id, command)
Found = dict[tuple[str, int], list[Binding]]  # by item: bindings the portal said it had already; adds made
Group = tuple[str, int, list[list[Step]]]  # an item and its stages: binds, moves, unbinds
WRITE_ATTEMPTS = 4  # per item; then the whole job retries later
TOO_MANY = "TOO_MANY_BINDINGS"  # the fake's code for an add past 100; a real portal's is undocumented


class TargetsGone(Exception):
    """Records the plan would bind to no longer exist; nothing was written. Plan again without them."""

    def __init__(self, targets: set[Binding]) -> None:
        self.targets = targets
        super().__init__(", ".join(sorted(str(t) for t in targets)) + " no longer exist(s) in the portal")


async def execute(plan: BindingPlan, client: RestClient) -> list[Outcome]:
    """Apply a plan: each item's binds, then its moves, then its unbinds, so an item loses a binding
    only once its binds succeeded; one item's failure stops only its own later steps.

    A portal accepts a binding to a record that does not exist, so every record the plan binds to is
    read first (as the first stage of the plan's one write group when it fits one call): a missing one
    stops everything before a write, and TargetsGone is raised.

    The portal's session packs the writes with every other job's, stage by stage.
    Raises TransientError (the job retries and re-reads first) or ConfigError (a person must act).
    """
    items: list[tuple[str, int, ItemPlan]] = [("activity", a.activity_id, a) for a in plan.activities
                                              if a.changes and not a.dry_run]
    items += [("comment", c.comment_id, c) for c in plan.comments if c.changes and not c.dry_run]
    failed: dict[tuple[str, int], list[B24Error]] = {}
    found: Found = {}
    added: Found = {}
    groups: list[Group] = [(kind, id_, [phase(kind, id_, item) for phase in (_binds, _moves, _unbinds)])
                           for kind, id_, item in items]
    checks = _target_checks(items)
    steps = sum(len(stage) for _, _, stages in groups for stage in stages)
    if steps and steps + len(checks) <= BATCH_LIMIT:
        groups = await _as_one_group(client, checks, groups, failed, (found, added))
    elif checks:
        _raise_gone(checks, await client.batch([command for _, command in checks]))
    ended = await asyncio.gather(*(_apply(client, group, failed, (found, added)) for group in groups),
                                 return_exceptions=True)
    ended += await _keep_crowded(client, failed, added)
    errors = [e for e in ended if isinstance(e, BaseException)]
    for kind in (ConfigError, MethodBlocked, BaseException):  # the one that says most about what to do
        first = next((e for e in errors if isinstance(e, kind)), None)
        if first is not None:
            raise first
    outcomes = [_outcome("activity", a.activity_id, a, failed.get(("activity", a.activity_id)),
                         found.get(("activity", a.activity_id))) for a in plan.activities if a.changes]
    return outcomes + [_outcome("comment", c.comment_id, c, failed.get(("comment", c.comment_id)))
                       for c in plan.comments if c.changes]


async def _as_one_group(client: RestClient, checks: list[tuple[Binding, Command]], groups: list[Group],
                        failed: dict[tuple[str, int], list[B24Error]], seen: tuple[Found, Found]) -> list[Group]:
    """A small plan as one write group (the targets' reads, all binds, all moves, all unbinds): a call
    that halts at the first error when it travels alone, one request for the whole job. Returns each
    item's steps that a failure of another item kept from running, to send again on their own."""
    stages = [[step for _, _, item_stages in groups for step in item_stages[n]] for n in range(3)]
    try:
        results = await client.write([[command for _, command in checks],
                                      *[[command for _, _, command in stage] for stage in stages]],
                                     stops=_stops)
    except TransientError as exc:
        if isinstance(exc, MethodBlocked):
            raise
        await asyncio.sleep(0.5)
        left = await _still_needed(client, [step for stage in stages for step in stage])  # landed or not: look
        return _regroup(groups, left)
    _raise_gone(checks, results[0])  # a target missing stopped the group before any write
    left = []
    for stage, stage_results in zip(stages, results[1:]):
        for step, result in zip(stage, stage_results):
            if result.error is not None and result.error.code == "NOT_RUN":
                left.append(step)  # stopped by another item's failure, or a check's
                continue
            _note(step, result, *seen)
            error = _failure(result)
            if error is not None:
                failed.setdefault(step[:2], []).append(error)
    return _regroup(groups, [step for step in left if step[:2] not in failed])


def _stops(result: CommandResult) -> bool:
    """A missing target stops the plan; its other errors (no rights on the record) are the write's to report."""
    if result.command.method.endswith(".get"):
        return result.error is not None and result.error.code == "NOT_FOUND"
    return stops_group(result)


def _regroup(groups: list[Group], steps: list[Step]) -> list[Group]:
    keep = {id(step) for step in steps}
    regrouped = [(kind, id_, [[step for step in stage if id(step) in keep] for stage in stages])
                 for kind, id_, stages in groups]
    return [group for group in regrouped if any(group[2])]


async def _apply(client: RestClient, group: Group, failed: dict[tuple[str, int], list[B24Error]],
                 seen: tuple[Found, Found]) -> None:
    """One item's stages, as a write group of its own; after a 5xx, re-read and send what is missing."""
    kind, id_, stages = group
    for attempt in range(WRITE_ATTEMPTS):
        try:
            results = await client.write([[command for _, _, command in stage] for stage in stages])
            break
        except TransientError as exc:
            # The writes may or may not have landed: look, then send only what is still missing.
            if isinstance(exc, MethodBlocked) or attempt + 1 == WRITE_ATTEMPTS:
                raise
            await asyncio.sleep(0.5 * 2**attempt)
            needed = {id(step) for step in await _still_needed(client, [step for stage in stages for step in stage])}
            stages = [[step for step in stage if id(step) in needed] for stage in stages]
    else:
        return
    for stage, stage_results in zip(stages, results):
        for step, result in zip(stage, stage_results):
            if step[:2] in failed and result.error is not None and result.error.code == "NOT_RUN":
                continue  # not sent: an earlier stage of this item failed
            _note(step, result, *seen)
            error = _failure(result)
            if error is not None:
                failed.setdefault(step[:2], []).append(error)


def _target_checks(items: list[tuple[str, int, ItemPlan]]) -> list[tuple[Binding, Command]]:
    """A read of each record the plan binds or moves something to."""
    targets = {b for _, _, item in items for b in item.add} | {t for _, _, item in items for _, t in item.moves}
    # Only whether it exists: a batch asks many jobs' checks of one kind as one list.
    return [(t, Command(f"crm.{TYPE_NAMES[t.entity_type]}.get", {"id": t.entity_id}, fields=("ID",)))
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
    if not steps:
        return []
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


def _note(step: Step, result: CommandResult, found: Found, added: Found) -> None:
    """What an add (or move) tells of the item: answered 'already bound', it found a binding the plan did
    not know of (an add made blind, without reading first), there before the job, which an undo must
    leave; answered with success, the binding is the job's own."""
    p = step[2].params
    if not step[2].method.startswith("crm.activity.binding.") or step[2].method.endswith(".delete"):
        return
    type_id, entity_id = ((p["targetEntityTypeId"], p["targetEntityId"]) if step[2].method.endswith(".move")
                          else (p["entityTypeId"], p["entityId"]))
    binding = Binding(entity_type=int(type_id), entity_id=int(entity_id))
    if result.error is None and step[2].method.endswith(".add"):
        added.setdefault(step[:2], []).append(binding)
    elif result.error is not None and result.error.code.upper() == "ACTIVITY_IS_ALREADY_BOUND":
        found.setdefault(step[:2], []).append(binding)


async def _keep_crowded(client: RestClient, failed: dict[tuple[str, int], list[B24Error]],
                        added: Found) -> list[BaseException | None]:
    """An activity the portal refused a binding past its 100 is left as it was found, as the rules
    engine's guard leaves one it knows to be that full: its unbinds were stopped with the refused add,
    and the adds of it that landed before the refusal are taken back. An add made blind (the activity's
    bindings not read) meets the limit only this way. Costs nothing unless the portal refuses."""
    crowded = [item for item, errors in failed.items() if any(e.code.upper() == TOO_MANY for e in errors)]
    for item in crowded:
        failed[item] = [e for e in failed[item] if e.code.upper() != TOO_MANY]
    groups: list[Group] = [(kind, id_, [[(kind, id_, _binding_command("crm.activity.binding.delete", id_, b))
                                          for b in added.get((kind, id_), [])]]) for kind, id_ in crowded]
    # An item left with no error is kept (see _outcome); one whose taking back failed stays failed.
    ended = await asyncio.gather(*(_apply(client, group, failed, ({}, {})) for group in groups if group[2][0]),
                                 return_exceptions=True)
    return list(ended)


def _outcome(kind: str, id_: int, item: ItemPlan, errors: list[B24Error] | None,
             found: list[Binding] | None = None) -> Outcome:
    # A binding write answering NOT_FOUND ("Element not found") means the activity itself is gone.
    gone = bool(errors) and all(e.code == "NOT_FOUND" for e in errors or [])
    kept = errors == []  # refused past 100 bindings and left as found (_keep_crowded)
    status = "dry_run" if item.dry_run else "kept" if kept else "gone" if gone else "failed" if errors else "changed"
    before = [*item.before, *(b for b in dict.fromkeys(found or []) if b not in item.before)]
    after = before if errors is not None else item.after  # a dry run's is what it would have been
    return Outcome(kind, id_, before, list(after), status,
                   [e.as_record() for e in errors or []])
