"""Writing one item's stages as a write group, and what each answer means: a write is done only when
the portal says `true`; 'already bound' and 'not bound any more' count as done; after a 5xx, the item's
bindings are read again and only what is missing is sent."""
from __future__ import annotations

import asyncio

from app.bitrix.client import CommandResult, RestClient
from app.bitrix.errors import POLICIES, B24Error, ConfigError, MethodBlocked, PermanentError, Policy, TransientError, policy_for
from app.bitrix.packing import stops_group
from app.rebind.binding_steps import Found, Group, Item, Step, Writes, still_needed
from app.rules.facts import Binding

WRITE_ATTEMPTS = 4  # per item; then the whole job retries later


def stops(result: CommandResult) -> bool:
    """A missing target stops the plan; its other errors (no rights on the record) are the write's to report.
    A write that answers anything but `true`, error or not, stops its group."""
    if result.command.method.endswith((".get", ".list")):
        return result.error is not None and result.error.code == "NOT_FOUND"
    return stops_group(result) or (result.error is None and result.result is not True)


async def apply(client: RestClient, group: Group, failed: dict[Item, list[B24Error]], found: Found) -> None:
    """One item's stages, as a write group of its own; after a 5xx, re-read and send what is missing."""
    kind, id_, stages = group
    for attempt in range(WRITE_ATTEMPTS):
        try:
            results = await client.write([[command for _, _, command in stage] for stage in stages], stops=stops)
            break
        except TransientError as exc:
            # The writes may or may not have landed: look, then send only what is still missing.
            if isinstance(exc, MethodBlocked) or attempt + 1 == WRITE_ATTEMPTS:
                raise
            await asyncio.sleep(0.5 * 2**attempt)
            needed = {id(step) for step in await still_needed(client, [step for stage in stages for step in stage])}
            stages = [[step for step in stage if id(step) in needed] for stage in stages]
    else:
        return
    for stage, stage_results in zip(stages, results):
        for step, result in zip(stage, stage_results):
            if step[:2] in failed and result.error is not None and result.error.code == "NOT_RUN":
                continue  # not sent: an earlier stage of this item failed
            note(step, result, found)
            error = failure(result)
            if error is not None:
                failed.setdefault(step[:2], []).append(error)


async def apply_comment(client: RestClient, writes: Writes, failed: dict[Item, list[B24Error]],
                         found: Found) -> None:
    """A comment's binds, then (a write of its own) its unbinds: crm.timeline.bindings.bind answers `false`
    without an error, which does not halt a batch, so an unbind in the same call would go all the same."""
    binds, _, unbinds = writes.stages()
    await apply(client, (writes.kind, writes.id, [binds]), failed, found)
    if writes.key not in failed and unbinds:
        await apply(client, (writes.kind, writes.id, [unbinds]), failed, found)


def failure(result: CommandResult) -> B24Error | None:
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


def note(step: Step, result: CommandResult, found: Found) -> None:
    """An add (or move) answered 'already bound' found a binding the plan did not know of (an add made
    blind, without reading first), there before the job, which an undo must leave."""
    p = step[2].params
    if not step[2].method.startswith("crm.activity.binding.") or step[2].method.endswith(".delete"):
        return
    type_id, entity_id = ((p["targetEntityTypeId"], p["targetEntityId"]) if step[2].method.endswith(".move")
                          else (p["entityTypeId"], p["entityId"]))
    if result.error is not None and result.error.code.upper() == "ACTIVITY_IS_ALREADY_BOUND":
        found.setdefault(step[:2], []).append(Binding(entity_type=int(type_id), entity_id=int(entity_id)))


