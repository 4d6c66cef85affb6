"""Writing to an activity that adding everything first would take to 100 bindings.

Since crm 25.1150.0 a save past 100 bindings drops the one with the lowest owner id and answers `true`
(docs/errors.md, "What the portal does silently"), so such an activity is written in stages that keep
its count at most 100: adds while there is room, then an unbind, then the next adds. After each add
its bindings are read and must hold everything expected before anything is unbound.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from app.bitrix.client import RestClient
from app.bitrix.errors import POLICIES, B24Error, PermanentError
from app.rebind.binding_steps import (
    MAX_BINDINGS,
    Found,
    Item,
    Step,
    Writes,
    bind_steps,
    current_bindings,
    move_steps,
    unbind_steps,
)
from app.rebind.write_groups import apply
from app.rules.facts import Binding


@dataclass
class CrowdedStages:
    """The stages still to write to a crowded activity, and what it should hold after those written."""

    writes: Writes
    expected: list[Binding] = field(init=False)
    count: int = field(init=False)  # its bindings now, as last read (or as the plan had them)
    adds: list[Binding] = field(init=False)
    moves: list[tuple[Binding, Binding]] = field(init=False)
    removes: list[Binding] = field(init=False)

    def __post_init__(self) -> None:
        self.expected, self.count = list(self.writes.has), len(self.writes.has)
        self.adds, self.moves, self.removes = list(self.writes.adds), list(self.writes.moves), list(self.writes.removes)

    @property
    def left(self) -> bool:
        return bool(self.adds or self.moves or self.removes)

    def next_stage(self) -> list[Step]:
        """Adds while there is room; the moves; then as many unbinds as the waiting adds need (every one
        once none wait). Empty: adds wait and nothing is left to unbind to make room."""
        kind, id_ = self.writes.key
        room = MAX_BINDINGS - self.count
        if self.adds and room > 0:
            stage, self.adds = self.adds[:room], self.adds[room:]
            self.expected += stage
            return bind_steps(kind, id_, stage)
        if self.moves:
            moved = {source for source, _ in self.moves}
            self.expected = [b for b in self.expected if b not in moved] + [target for _, target in self.moves]
            stage_moves, self.moves = self.moves, []
            return move_steps(kind, id_, stage_moves)
        taken = len(self.removes) if not self.adds else min(len(self.removes), len(self.adds))
        unbound, self.removes = self.removes[:taken], self.removes[taken:]
        self.expected = [b for b in self.expected if b not in unbound]
        self.count -= len(unbound)
        return unbind_steps(kind, id_, unbound)


async def apply_crowded(client: RestClient, writes: Writes, failed: dict[Item, list[B24Error]],
                        found: Found) -> None:
    """Each stage as a write group of its own; after an add, the bindings read back before going on."""
    stages = CrowdedStages(writes)
    while stages.left:
        steps = stages.next_stage()
        if not steps:  # bindings added by someone else meanwhile took the room the plan needed
            failed[writes.key] = [_full(writes, stages.count)]
            return
        await apply(client, (writes.kind, writes.id, [steps]), failed, found)
        if writes.key in failed:
            return
        if steps[0][2].method.endswith(".delete"):
            continue
        (now,) = await current_bindings(client, [writes.key])
        missing = [b for b in stages.expected if b not in now]
        if missing:
            failed[writes.key] = [_dropped(writes, missing)]
            return
        stages.count = len(now)


def _full(writes: Writes, count: int) -> B24Error:
    return PermanentError("crm.activity.binding.add", "BINDINGS_FULL",
                          f"activity {writes.id} has {count} bindings: no room left", hint=POLICIES["BINDINGS_FULL"].hint)


def _dropped(writes: Writes, missing: list[Binding]) -> B24Error:
    return PermanentError("crm.activity.binding.list", "BINDING_DROPPED",
                          f"activity {writes.id} no longer has {', '.join(str(b) for b in missing)} after the job "
                          "added to it", hint=POLICIES["BINDING_DROPPED"].hint)
