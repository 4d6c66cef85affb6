"""An item's binding writes as commands, and the reads of its bindings: what the executor sends.

An item is an activity (`crm.activity.binding.*`) or a timeline comment (`crm.timeline.bindings.*`);
a step is one command for one item. A record the plan binds to is checked first, since a portal
accepts a binding to a record that does not exist.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app.bitrix.client import Command, CommandResult, RestClient
from app.rebind.reading import TYPE_BY_NAME, TYPE_NAMES
from app.rules.facts import Binding
from app.rules.plan import ItemPlan

Step = tuple[str, int, Command]  # (kind, id, command)
Item = tuple[str, int]  # (kind, id)
Found = dict[Item, list[Binding]]  # by item: bindings it had that the plan did not know of
Group = tuple[str, int, list[list[Step]]]  # an item and its stages: binds, moves, unbinds
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
        return [bind_steps(self.kind, self.id, self.adds), move_steps(self.kind, self.id, self.moves),
                unbind_steps(self.kind, self.id, self.removes)]

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


def target_checks(items: list[tuple[str, int, ItemPlan]]) -> list[tuple[Binding, Command]]:
    """A read of each record the plan binds or moves something to."""
    targets = {b for _, _, item in items for b in item.add} | {t for _, _, item in items for _, t in item.moves}
    # Only whether it exists: a batch asks many jobs' checks of one kind as one list.
    return [(t, Command(f"crm.{TYPE_NAMES[t.entity_type]}.get", {"id": t.entity_id}, fields=("ID",)))
            for t in sorted(targets, key=lambda b: (int(b.entity_type), b.entity_id)) if t.entity_type in TYPE_NAMES]


def raise_gone(checks: list[tuple[Binding, Command]], results: Sequence[CommandResult]) -> None:
    """Other errors of a check (no rights on the record) are left to the write, which reports them."""
    gone = {target for (target, _), result in zip(checks, results)
            if result.error is not None and result.error.code == "NOT_FOUND"}
    if gone:
        raise TargetsGone(gone)


def bind_steps(kind: str, id_: int, adds: Sequence[Binding]) -> list[Step]:
    if kind == "comment":
        return [(kind, id_, _comment_command("crm.timeline.bindings.bind", id_, b)) for b in adds]
    return [(kind, id_, _binding_command("crm.activity.binding.add", id_, b)) for b in adds]


def move_steps(kind: str, id_: int, moves: Sequence[tuple[Binding, Binding]]) -> list[Step]:
    return [(kind, id_, Command("crm.activity.binding.move", {
        "activityId": id_, "sourceEntityTypeId": int(source.entity_type), "sourceEntityId": source.entity_id,
        "targetEntityTypeId": int(target.entity_type), "targetEntityId": target.entity_id}))
        for source, target in moves]


def unbind_steps(kind: str, id_: int, removes: Sequence[Binding]) -> list[Step]:
    if kind == "comment":
        return [(kind, id_, _comment_command("crm.timeline.bindings.unbind", id_, b)) for b in removes]
    return [(kind, id_, _binding_command("crm.activity.binding.delete", id_, b)) for b in removes]


def _binding_command(method: str, activity_id: int, binding: Binding) -> Command:
    return Command(method, {"activityId": activity_id, "entityTypeId": int(binding.entity_type),
                            "entityId": binding.entity_id})


def _comment_command(method: str, comment_id: int, binding: Binding) -> Command:
    return Command(method, {"fields": {"OWNER_ID": comment_id, "ENTITY_ID": binding.entity_id,
                                       "ENTITY_TYPE": TYPE_NAMES[binding.entity_type]}})


def binding_reads(items: Sequence[Item]) -> list[Command]:
    return [Command("crm.activity.binding.list", {"activityId": id_}) if kind == "activity"
            else Command("crm.timeline.bindings.list", {"filter": {"OWNER_ID": id_}}) for kind, id_ in items]


def bindings_of(kind: str, rows: Any) -> list[Binding]:
    if kind == "activity":
        return [Binding(entity_type=int(b["entityTypeId"]), entity_id=int(b["entityId"])) for b in rows or []]
    return [Binding(entity_type=int(TYPE_BY_NAME.get(str(b["ENTITY_TYPE"]).lower(), 0)),
                    entity_id=int(b["ENTITY_ID"])) for b in rows or []]


async def current_bindings(client: RestClient, items: Sequence[Item]) -> list[list[Binding]]:
    """The bindings each (kind, id) has now, in one batch; a read that fails raises its error."""
    current = []
    for (kind, _), result in zip(items, await client.batch(binding_reads(items))):
        if result.error:
            raise result.error
        current.append(bindings_of(kind, result.result))
    return current


async def still_needed(client: RestClient, steps: Sequence[Step]) -> list[Step]:
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


