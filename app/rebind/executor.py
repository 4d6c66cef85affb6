"""Carrying out a BindingPlan: bind first, move, unbind last, and only what is still missing."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.bitrix.client import BATCH_LIMIT, Command, CommandResult, RestClient
from app.bitrix.errors import (
    POLICIES,
    B24Error,
    ConfigError,
    MethodBlocked,
    PermanentError,
    Policy,
    TransientError,
    policy_for,
)
from app.bitrix.packing import stops_group
from app.rebind.reading import TYPE_BY_NAME, TYPE_NAMES
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
    # plan would take it past 100 bindings, which the portal trims without a word: left as found)
    status: str
    errors: list[dict[str, Any]] = field(default_factory=list)

    def as_record(self) -> dict[str, Any]:
        return {self.kind: self.id, "before": bindings_json(self.before), "after": bindings_json(self.after),
                "status": self.status,
                "errors": self.errors}


Step = tuple[str, int, Command]  # (kind, id, command)
Item = tuple[str, int]  # (kind, id)
Found = dict[Item, list[Binding]]  # by item: bindings it had that the plan did not know of
Group = tuple[str, int, list[list[Step]]]  # an item and its stages: binds, moves, unbinds
WRITE_ATTEMPTS = 4  # per item; then the whole job retries later
# Since crm 25.1150.0 a save past this many bindings keeps those with the highest owner id and answers
# true; before, there was no cap (crm_activity.php, DoSaveBindings). The count never passes it here.
MAX_BINDINGS = 100


@dataclass
class Writes:
    """What one activity or comment needs written, against what it has (read, or as the plan assumed)."""

    kind: str
    id: int
    has: list[Binding]
    adds: list[Binding]
    moves: list[tuple[Binding, Binding]]
    removes: list[Binding]

    @property
    def key(self) -> Item:
        return self.kind, self.id

    def stages(self) -> list[list[Step]]:
        return [_binds(self.kind, self.id, self.adds), _moves(self.kind, self.id, self.moves),
                _unbinds(self.kind, self.id, self.removes)]

    @property
    def fits(self) -> bool:
        """Whether the writes can be ordered so the count never passes 100 (an add needs room for one)."""
        final = len(self.has) + len(self.adds) - len(self.removes)
        return self.kind != "activity" or not self.adds or (final <= MAX_BINDINGS and len(self.has) < MAX_BINDINGS)

    @property
    def crowded(self) -> bool:
        """Adding everything first would reach the cap: added in steps, each checked before an unbind."""
        return self.kind == "activity" and bool(self.adds) and len(self.has) + len(self.adds) >= MAX_BINDINGS


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

    A portal also answers some things without a word (docs/errors.md, "What the portal does silently"):
    - a save past 100 bindings drops the one with the lowest owner id and answers true. An activity whose
      bindings were assumed (not read) has them read with the targets' checks, before any write; one
      the plan cannot fit is left as found (`kept`); one that adding everything first would take to 100
      is written add, unbind, add, each add checked (everything there, nothing else gone) before an unbind;
    - a write that answers anything but `true` (timeline bindings answer `false` with no error) failed:
      its group stops, and a comment's unbinds are sent only once its binds answered true.

    The portal's batcher packs the writes with every other job's, stage by stage.
    Raises TransientError (the job retries and re-reads first) or ConfigError (a person must act).
    """
    items: list[tuple[str, int, ItemPlan]] = [("activity", a.activity_id, a) for a in plan.activities
                                              if a.changes and not a.dry_run]
    items += [("comment", c.comment_id, c) for c in plan.comments if c.changes and not c.dry_run]
    failed: dict[Item, list[B24Error]] = {}
    found: Found = {}
    checks = _target_checks(items)
    unread = [("activity", a.activity_id) for a in plan.activities
              if a.changes and not a.dry_run and not a.bindings_read and a.add]
    read: dict[Item, list[Binding]] = {}
    if unread:  # their count decides the order of the writes: read it with the checks, before any write
        read = await _read_with_checks(client, checks, unread, failed)
        checks = []
    writes = [_writes(kind, id_, item, read.get((kind, id_)), found) for kind, id_, item in items
              if (kind, id_) not in failed]
    kept = {w.key for w in writes if not w.fits}
    plain = [w for w in writes if w.fits and not w.crowded and w.kind == "activity"]
    alone = [w for w in writes if w.fits and (w.crowded or w.kind == "comment")]
    if alone and checks:  # these go as several writes: nothing is written before every target is known
        _raise_gone(checks, await client.batch([command for _, command in checks]))
        checks = []
    groups: list[Group] = [(w.kind, w.id, w.stages()) for w in plain]
    steps = sum(len(stage) for _, _, stages in groups for stage in stages)
    if steps and steps + len(checks) <= BATCH_LIMIT:
        groups = await _as_one_group(client, checks, groups, failed, found)
    elif checks:
        _raise_gone(checks, await client.batch([command for _, command in checks]))
    ended = await asyncio.gather(*(_apply(client, group, failed, found) for group in groups),
                                 *(_apply_comment(client, w, failed, found) for w in alone if w.kind == "comment"),
                                 *(_apply_crowded(client, w, failed, found) for w in alone if w.kind == "activity"),
                                 return_exceptions=True)
    _raise_the_most_telling([e for e in ended if isinstance(e, BaseException)])
    return _outcomes(plan, failed, found, kept)


async def _read_with_checks(client: RestClient, checks: list[tuple[Binding, Command]], unread: list[Item],
                            failed: dict[Item, list[B24Error]]) -> dict[Item, list[Binding]]:
    """The targets' checks and the bindings of the activities whose bindings were assumed, in one read;
    an activity whose bindings could not be read fails (in `failed`), a target gone raises TargetsGone."""
    results = await client.batch([command for _, command in checks] + _binding_reads(unread))
    _raise_gone(checks, results[:len(checks)])
    read: dict[Item, list[Binding]] = {}
    for key, result in zip(unread, results[len(results) - len(unread):]):
        if result.error is not None:
            failed[key] = [_read_failure(result.error)]
        else:
            read[key] = _bindings_of("activity", result.result)
    return read


def _raise_the_most_telling(errors: list[BaseException]) -> None:
    for kind in (ConfigError, MethodBlocked, BaseException):  # the one that says most about what to do
        first = next((e for e in errors if isinstance(e, kind)), None)
        if first is not None:
            raise first


def _outcomes(plan: BindingPlan, failed: dict[Item, list[B24Error]], found: Found, kept: set[Item]) -> list[Outcome]:
    outcomes = [_outcome("activity", a.activity_id, a, failed.get(("activity", a.activity_id)),
                         found.get(("activity", a.activity_id)), ("activity", a.activity_id) in kept)
                for a in plan.activities if a.changes]
    return outcomes + [_outcome("comment", c.comment_id, c, failed.get(("comment", c.comment_id)),
                                found.get(("comment", c.comment_id)), ("comment", c.comment_id) in kept)
                       for c in plan.comments if c.changes]


def _writes(kind: str, id_: int, item: ItemPlan, read: list[Binding] | None, found: Found) -> Writes:
    """The item's writes against its bindings as read (those the plan did not know of join `found`,
    so the outcome's `before`, and an undo, keep them), or as the plan has them."""
    if read is None:
        return Writes(kind, id_, list(item.before), item.add, list(item.moves), item.remove)
    extra = [b for b in read if b not in item.before]
    if extra:
        found.setdefault((kind, id_), []).extend(extra)
    return Writes(kind, id_, read, [b for b in item.add if b not in read],
                  [(s, t) for s, t in item.moves if s in read and t not in read],
                  [b for b in item.remove if b in read])


async def _apply_comment(client: RestClient, writes: Writes, failed: dict[Item, list[B24Error]],
                         found: Found) -> None:
    """A comment's binds, then (a write of its own) its unbinds: crm.timeline.bindings.bind answers `false`
    without an error, which does not halt a batch, so an unbind in the same call would go all the same."""
    binds, _, unbinds = writes.stages()
    await _apply(client, (writes.kind, writes.id, [binds]), failed, found)
    if writes.key not in failed and unbinds:
        await _apply(client, (writes.kind, writes.id, [unbinds]), failed, found)


async def _apply_crowded(client: RestClient, writes: Writes, failed: dict[Item, list[B24Error]],
                         found: Found) -> None:
    """An activity that adding everything first would take to 100 bindings: adds while there is room,
    then an unbind, then the next adds; after each add, its bindings are read and must hold everything
    expected (nothing dropped by a save past the cap) before anything is unbound."""
    expected = list(writes.has)
    count = len(writes.has)
    adds, moves, removes = list(writes.adds), list(writes.moves), list(writes.removes)
    while adds or moves or removes:
        room = MAX_BINDINGS - count
        if adds and room > 0:
            stage, adds = adds[:room], adds[room:]
            steps = _binds(writes.kind, writes.id, stage)
            expected += stage
        elif moves:
            steps, moves = _moves(writes.kind, writes.id, moves), []
            expected = [b for b in expected if b not in {s for s, _ in writes.moves}] + [t for _, t in writes.moves]
        else:
            taken = len(removes) if not adds else min(len(removes), len(adds))
            stage, removes = removes[:taken], removes[taken:]
            steps = _unbinds(writes.kind, writes.id, stage)
            expected = [b for b in expected if b not in stage]
            count -= len(stage)
            if not steps:  # bindings added by someone else meanwhile took the room the plan needed
                failed[writes.key] = [PermanentError("crm.activity.binding.add", "BINDINGS_FULL",
                                                     f"activity {writes.id} has {count} bindings: no room left",
                                                     hint=POLICIES["BINDINGS_FULL"].hint)]
                return
        await _apply(client, (writes.kind, writes.id, [steps]), failed, found)
        if writes.key in failed:
            return
        if steps[0][2].method.endswith(".delete"):
            continue
        (now,) = await current_bindings(client, [writes.key])
        missing = [b for b in expected if b not in now]
        if missing:
            failed[writes.key] = [PermanentError(
                "crm.activity.binding.list", "BINDING_DROPPED",
                f"activity {writes.id} no longer has {', '.join(str(b) for b in missing)} after the job added to it",
                hint=POLICIES["BINDING_DROPPED"].hint)]
            return
        count = len(now)


def _read_failure(error: B24Error) -> B24Error:
    """A binding read that failed: the activity gone ends the item as `gone`; anything else, the job."""
    if error.code == "NOT_FOUND" or isinstance(error, PermanentError):
        return error
    raise error


async def _as_one_group(client: RestClient, checks: list[tuple[Binding, Command]], groups: list[Group],
                        failed: dict[Item, list[B24Error]], found: Found) -> list[Group]:
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
            _note(step, result, found)
            error = _failure(result)
            if error is not None:
                failed.setdefault(step[:2], []).append(error)
    return _regroup(groups, [step for step in left if step[:2] not in failed])


def _stops(result: CommandResult) -> bool:
    """A missing target stops the plan; its other errors (no rights on the record) are the write's to report.
    A write that answers anything but `true`, error or not, stops its group."""
    if result.command.method.endswith((".get", ".list")):
        return result.error is not None and result.error.code == "NOT_FOUND"
    return stops_group(result) or (result.error is None and result.result is not True)


def _regroup(groups: list[Group], steps: list[Step]) -> list[Group]:
    keep = {id(step) for step in steps}
    regrouped = [(kind, id_, [[step for step in stage if id(step) in keep] for stage in stages])
                 for kind, id_, stages in groups]
    return [group for group in regrouped if any(group[2])]


async def _apply(client: RestClient, group: Group, failed: dict[Item, list[B24Error]], found: Found) -> None:
    """One item's stages, as a write group of its own; after a 5xx, re-read and send what is missing."""
    kind, id_, stages = group
    for attempt in range(WRITE_ATTEMPTS):
        try:
            results = await client.write([[command for _, _, command in stage] for stage in stages], stops=_stops)
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
            _note(step, result, found)
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


def _binds(kind: str, id_: int, adds: Sequence[Binding]) -> list[Step]:
    if kind == "comment":
        return [(kind, id_, _comment_command("crm.timeline.bindings.bind", id_, b)) for b in adds]
    return [(kind, id_, _binding_command("crm.activity.binding.add", id_, b)) for b in adds]


def _moves(kind: str, id_: int, moves: Sequence[tuple[Binding, Binding]]) -> list[Step]:
    return [(kind, id_, Command("crm.activity.binding.move", {
        "activityId": id_, "sourceEntityTypeId": int(source.entity_type), "sourceEntityId": source.entity_id,
        "targetEntityTypeId": int(target.entity_type), "targetEntityId": target.entity_id}))
        for source, target in moves]


def _unbinds(kind: str, id_: int, removes: Sequence[Binding]) -> list[Step]:
    if kind == "comment":
        return [(kind, id_, _comment_command("crm.timeline.bindings.unbind", id_, b)) for b in removes]
    return [(kind, id_, _binding_command("crm.activity.binding.delete", id_, b)) for b in removes]


def _binding_command(method: str, activity_id: int, binding: Binding) -> Command:
    return Command(method, {"activityId": activity_id, "entityTypeId": int(binding.entity_type),
                            "entityId": binding.entity_id})


def _comment_command(method: str, comment_id: int, binding: Binding) -> Command:
    return Command(method, {"fields": {"OWNER_ID": comment_id, "ENTITY_ID": binding.entity_id,
                                       "ENTITY_TYPE": TYPE_NAMES[binding.entity_type]}})


def _binding_reads(items: Sequence[Item]) -> list[Command]:
    return [Command("crm.activity.binding.list", {"activityId": id_}) if kind == "activity"
            else Command("crm.timeline.bindings.list", {"filter": {"OWNER_ID": id_}}) for kind, id_ in items]


def _bindings_of(kind: str, rows: Any) -> list[Binding]:
    if kind == "activity":
        return [Binding(entity_type=int(b["entityTypeId"]), entity_id=int(b["entityId"])) for b in rows or []]
    return [Binding(entity_type=int(TYPE_BY_NAME.get(str(b["ENTITY_TYPE"]).lower(), 0)),
                    entity_id=int(b["ENTITY_ID"])) for b in rows or []]


async def current_bindings(client: RestClient, items: Sequence[Item]) -> list[list[Binding]]:
    """The bindings each (kind, id) has now, in one batch; a read that fails raises its error."""
    current = []
    for (kind, _), result in zip(items, await client.batch(_binding_reads(items))):
        if result.error:
            raise result.error
        current.append(_bindings_of(kind, result.result))
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
    """The error that counts as a failure; 'already bound' and 'not bound any more' count as done. A write
    is done only when the portal says `true`: anything else without an error is a failure of its own."""
    error = result.error
    if error is None and result.result is not True:
        method = result.command.method
        return PermanentError(method, "WRITE_NOT_CONFIRMED", f"{method} answered {result.result!r}, not true",
                              hint=POLICIES["WRITE_NOT_CONFIRMED"].hint)
    if error is None or policy_for(error.code).policy == Policy.DONE:
        return None
    if isinstance(error, (TransientError, ConfigError)):
        raise error
    return error


def _note(step: Step, result: CommandResult, found: Found) -> None:
    """An add (or move) answered 'already bound' found a binding the plan did not know of (an add made
    blind, without reading first), there before the job, which an undo must leave."""
    p = step[2].params
    if not step[2].method.startswith("crm.activity.binding.") or step[2].method.endswith(".delete"):
        return
    type_id, entity_id = ((p["targetEntityTypeId"], p["targetEntityId"]) if step[2].method.endswith(".move")
                          else (p["entityTypeId"], p["entityId"]))
    if result.error is not None and result.error.code.upper() == "ACTIVITY_IS_ALREADY_BOUND":
        found.setdefault(step[:2], []).append(Binding(entity_type=int(type_id), entity_id=int(entity_id)))


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
