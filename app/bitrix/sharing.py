"""Batches that concurrent jobs of one process send to one portal, sent together in one `batch` call.

A worker runs up to 40 jobs at once (`B24_WORKER_JOBS`), and most of them read an activity, its
bindings and its lead, then write a few bindings. While one job's call is on its way to a portal, the
calls other jobs ask for wait and leave together in the next one, up to 50 commands: under load the
portal sees one request where it would have seen several (at 2 requests a second that is the whole
game), and the worker sends fewer HTTP requests. Nobody waits for company: a call that finds nothing
in flight leaves at once.

Calls travel only with calls of the same kind (reads; writes; writes that halt at the first error).
A halting write shared with another job keeps its guarantee: sub-calls run in order and each job's
binds come before its unbinds, so nothing is unbound unless its binds succeeded. A halt caused by
one job stops the commands of the jobs after it; they come back NOT_RUN and their executor sends
them again on their own.

The call is made by the first job's RestClient (its budget, its token, its retries); the request is
counted on that job, and each job gets its own commands' results, or the call's error.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from app.bitrix.client import BATCH_LIMIT, Command, CommandResult, RestClient


@dataclass
class _Part:
    client: RestClient
    commands: list[Command]
    done: asyncio.Future[list[CommandResult]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class _Lane:
    """The calls of one kind waiting for the one in flight."""

    write: bool
    halt: bool
    waiting: list[_Part] = field(default_factory=list)
    sender: asyncio.Task[None] | None = None


class SharedBatches:
    """One portal's batch calls in this process (one instance per portal and priority)."""

    def __init__(self) -> None:
        self._lanes: dict[tuple[bool, bool], _Lane] = {}
        self.shared_calls = 0  # calls that carried more than one job's commands, for tests

    async def batch(self, client: RestClient, commands: Sequence[Command], *, write: bool,
                    halt: bool) -> list[CommandResult]:
        lane = self._lanes.setdefault((write, halt), _Lane(write, halt))
        part = _Part(client, list(commands))
        lane.waiting.append(part)
        if lane.sender is None:
            lane.sender = asyncio.create_task(self._send_while_waiting(lane))
            lane.sender.add_done_callback(lambda sender: _sender_ended(lane, sender))
        return await part.done

    async def close(self) -> None:
        """Stop the calls on their way (the worker is stopping): their jobs are cancelled already, or
        are told so, and the HTTP session can close with no request left in it."""
        senders = [lane.sender for lane in self._lanes.values() if lane.sender is not None]
        for sender in senders:
            sender.cancel()
        await asyncio.gather(*senders, return_exceptions=True)

    async def _send_while_waiting(self, lane: _Lane) -> None:
        try:
            while lane.waiting:
                await asyncio.sleep(0)  # the jobs already running this turn of the loop add their calls
                await self._send(lane, _next_group(lane))
        finally:
            lane.sender = None

    async def _send(self, lane: _Lane, group: list[_Part]) -> None:
        live = [part for part in group if not part.done.done()]  # a job cancelled meanwhile needs nothing
        if not live:
            return
        self.shared_calls += len(live) > 1
        try:
            results = await live[0].client.send_batch([c for part in live for c in part.commands],
                                                      write=lane.write, halt=lane.halt)
        except asyncio.CancelledError:  # the worker is stopping: nobody waits for an answer that won't come
            for part in live:
                part.done.cancel()
            raise
        except Exception as exc:  # every job of the call learns what went wrong, as if it had called alone
            for part in live:
                if not part.done.done():
                    part.done.set_exception(exc)
            return
        start = 0
        for part in live:
            if not part.done.done():
                part.done.set_result(results[start:start + len(part.commands)])
            start += len(part.commands)


def _sender_ended(lane: _Lane, sender: asyncio.Task[None]) -> None:
    """A sender cancelled (the worker is stopping) leaves no job waiting for a call that won't leave."""
    if lane.sender is sender:  # cancelled before it ever ran
        lane.sender = None
    if sender.cancelled() and lane.sender is None:
        for part in lane.waiting:
            part.done.cancel()
        lane.waiting.clear()


def _next_group(lane: _Lane) -> list[_Part]:
    group = [lane.waiting.pop(0)]
    size = len(group[0].commands)
    while lane.waiting and size + len(lane.waiting[0].commands) <= BATCH_LIMIT:
        size += len(lane.waiting[0].commands)
        group.append(lane.waiting.pop(0))
    return group
