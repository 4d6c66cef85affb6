"""Carrying out a BindingPlan: bind first, move, unbind last, and only what is still missing.

Each item's binds, then its moves, then its unbinds, so an item loses a binding only once its binds
succeeded; one item's failure stops only its own later steps. The portal's batcher packs the writes
with every other job's, stage by stage.

A portal accepts a binding to a record that does not exist, so every record the plan binds to is read
first (as the first stage of the plan's one write group when it fits one call): a missing one stops
everything before a write, and TargetsGone is raised.

A portal also answers some things without a word (docs/errors.md, "What the portal does silently"):
- a save past 100 bindings drops the one with the lowest owner id and answers true. An activity whose
  bindings were assumed (not read) has them read with the targets' checks, before any write; one the
  plan cannot fit is left as found (`kept`); one that adding everything first would take to 100 is
  written add, unbind, add, each add checked before an unbind (app/rebind/crowded.py);
- a write that answers anything but `true` (timeline bindings answer `false` with no error) failed:
  its group stops, and a comment's unbinds are sent only once its binds answered true.
"""
from __future__ import annotations

import asyncio

from app.bitrix.client import BATCH_LIMIT, Command, RestClient
from app.bitrix.errors import B24Error, ConfigError, MethodBlocked, PermanentError, TransientError
from app.rebind.binding_steps import (
    Found,
    Group,
    Item,
    Step,
    TargetsGone,
    Writes,
    binding_reads,
    bindings_of,
    raise_gone,
    still_needed,
    target_checks,
)
from app.rebind.crowded import apply_crowded
from app.rebind.item_outcomes import Outcome, outcomes
from app.rebind.write_groups import apply, apply_comment, failure, note, stops
from app.rules.facts import Binding
from app.rules.plan import BindingPlan, ItemPlan

__all__ = ["Outcome", "TargetsGone", "execute"]


async def execute(plan: BindingPlan, client: RestClient) -> list[Outcome]:
    """Apply a plan, in the order and with the checks the module's docstring gives.
    Raises TargetsGone (nothing written), TransientError (the job retries and re-reads first) or
    ConfigError (a person must act)."""
    failed: dict[Item, list[B24Error]] = {}
    found: Found = {}
    items = _items_to_write(plan)
    checks = target_checks(items)
    unread = [("activity", a.activity_id) for a in plan.activities
              if a.changes and not a.dry_run and not a.bindings_read and a.add]
    read: dict[Item, list[Binding]] = {}
    if unread:  # their count decides the order of the writes: read it with the checks, before any write
        read = await _read_with_checks(client, checks, unread, failed)
        checks = []
    writes = [_writes(kind, id_, item, read.get((kind, id_)), found) for kind, id_, item in items
              if (kind, id_) not in failed]
    await _write(client, [w for w in writes if w.fits], checks, failed, found)
    return outcomes(plan, failed, found, {w.key for w in writes if not w.fits})


def _items_to_write(plan: BindingPlan) -> list[tuple[str, int, ItemPlan]]:
    items: list[tuple[str, int, ItemPlan]] = [("activity", a.activity_id, a) for a in plan.activities
                                              if a.changes and not a.dry_run]
    return items + [("comment", c.comment_id, c) for c in plan.comments if c.changes and not c.dry_run]


async def _write(client: RestClient, writes: list[Writes], checks: list[tuple[Binding, Command]],
                 failed: dict[Item, list[B24Error]], found: Found) -> None:
    """The plain activities as one write group when it fits one call, with the checks not yet made;
    comments and crowded activities as several writes each, sent only once every target is known."""
    plain = [w for w in writes if not w.crowded and w.kind == "activity"]
    alone = [w for w in writes if w.crowded or w.kind == "comment"]
    if alone and checks:
        raise_gone(checks, await client.batch([command for _, command in checks]))
        checks = []
    groups: list[Group] = [(w.kind, w.id, w.stages()) for w in plain]
    steps = sum(len(stage) for _, _, stages in groups for stage in stages)
    if steps and steps + len(checks) <= BATCH_LIMIT:
        groups = await _as_one_group(client, checks, groups, failed, found)
    elif checks:
        raise_gone(checks, await client.batch([command for _, command in checks]))
    ended = await asyncio.gather(*(apply(client, group, failed, found) for group in groups),
                                 *(apply_comment(client, w, failed, found) for w in alone if w.kind == "comment"),
                                 *(apply_crowded(client, w, failed, found) for w in alone if w.kind == "activity"),
                                 return_exceptions=True)
    _raise_the_most_telling([e for e in ended if isinstance(e, BaseException)])


async def _read_with_checks(client: RestClient, checks: list[tuple[Binding, Command]], unread: list[Item],
                            failed: dict[Item, list[B24Error]]) -> dict[Item, list[Binding]]:
    """The targets' checks and the bindings of the activities whose bindings were assumed, in one read;
    an activity whose bindings could not be read fails (in `failed`), a target gone raises TargetsGone."""
    results = await client.batch([command for _, command in checks] + binding_reads(unread))
    raise_gone(checks, results[:len(checks)])
    read: dict[Item, list[Binding]] = {}
    for key, result in zip(unread, results[len(results) - len(unread):]):
        if result.error is not None:
            failed[key] = [_readfailure(result.error)]
        else:
            read[key] = bindings_of("activity", result.result)
    return read


def _raise_the_most_telling(errors: list[BaseException]) -> None:
    for kind in (ConfigError, MethodBlocked, BaseException):  # the one that says most about what to do
        first = next((e for e in errors if isinstance(e, kind)), None)
        if first is not None:
            raise first


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


def _readfailure(error: B24Error) -> B24Error:
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
                                     stops=stops)
    except TransientError as exc:
        if isinstance(exc, MethodBlocked):
            raise
        await asyncio.sleep(0.5)
        left = await still_needed(client, [step for stage in stages for step in stage])  # landed or not: look
        return _regroup(groups, left)
    raise_gone(checks, results[0])  # a target missing stopped the group before any write
    left = []
    for stage, stage_results in zip(stages, results[1:]):
        for step, result in zip(stage, stage_results):
            if result.error is not None and result.error.code == "NOT_RUN":
                left.append(step)  # stopped by another item's failure, or a check's
                continue
            note(step, result, found)
            error = failure(result)
            if error is not None:
                failed.setdefault(step[:2], []).append(error)
    return _regroup(groups, [step for step in left if step[:2] not in failed])


def _regroup(groups: list[Group], steps: list[Step]) -> list[Group]:
    keep = {id(step) for step in steps}
    regrouped = [(kind, id_, [[step for step in stage if id(step) in keep] for stage in stages])
                 for kind, id_, stages in groups]
    return [group for group in regrouped if any(group[2])]
