"""Reads that concurrent jobs of one process make of one portal, sent together in one `batch` call.

A worker runs up to ten jobs at once, and most of them start by reading an activity, its bindings
and its lead. While one read batch is on its way to a portal, the reads other jobs ask for wait and
leave together in the next call, up to 50 commands: under load the portal sees one request where it
would have seen several (at 2 requests a second that is the whole game), and the worker sends fewer
HTTP requests. Nobody waits for company: a read that finds nothing in flight leaves at once.

The call is made by the first job's RestClient (its budget, its token, its retries); the request is
counted on that job, and each job gets its own commands' results, or the call's error.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from app.bitrix.client import BATCH_LIMIT, Command, CommandResult, RestClient


@dataclass
class _Read:
    client: RestClient
    commands: list[Command]
    done: asyncio.Future[list[CommandResult]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class SharedReads:
    """One portal's reads in this process (one instance per portal and priority)."""

    def __init__(self) -> None:
        self._waiting: list[_Read] = []
        self._sender: asyncio.Task[None] | None = None
        self.calls = 0  # batch calls sent, for tests and benchmarks
        self.shared_calls = 0  # of which carried more than one job's reads

    async def read(self, client: RestClient, commands: Sequence[Command]) -> list[CommandResult]:
        read = _Read(client, list(commands))
        self._waiting.append(read)
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_while_waiting())
        return await read.done

    async def _send_while_waiting(self) -> None:
        try:
            while self._waiting:
                await asyncio.sleep(0)  # the jobs already running this turn of the loop add their reads
                await self._send(self._next_group())
        finally:
            self._sender = None

    def _next_group(self) -> list[_Read]:
        group = [self._waiting.pop(0)]
        size = len(group[0].commands)
        while self._waiting and size + len(self._waiting[0].commands) <= BATCH_LIMIT:
            size += len(self._waiting[0].commands)
            group.append(self._waiting.pop(0))
        return group

    async def _send(self, group: list[_Read]) -> None:
        live = [read for read in group if not read.done.done()]  # a job cancelled meanwhile needs nothing
        if not live:
            return
        self.calls += 1
        self.shared_calls += len(live) > 1
        try:
            results = await live[0].client.send_batch([c for read in live for c in read.commands])
        except Exception as exc:  # every job of the call learns what went wrong, as if it had called alone
            for read in live:
                if not read.done.done():
                    read.done.set_exception(exc)
            return
        start = 0
        for read in live:
            if not read.done.done():
                read.done.set_result(results[start:start + len(read.commands)])
            start += len(read.commands)
