"""PortalBatcher: the one sender of a portal's requests in this process.

A portal allows about 2 requests a second (burst 50); a `batch` carries up to 50 commands for the
price of one request. So every job of a process hands its commands to the portal's one batcher and
awaits their results, and the batcher fills each `batch` from every job waiting:

- reads travel with reads, writes with writes (a read is re-sent after a 5xx, a write never is); a
  write group's stage that only reads (the targets' checks before its writes) travels with the reads
  when the groups waiting do not fit one call, rather than take a request of its own for a few lists;
- a job's writes are a *group* of stages (binds and moves, then unbinds): a stage leaves only once
  the one before it succeeded, so an activity loses its lead only after it gained its client; a
  command that fails stops the later stages of its own group and of no other;
- when everything waiting fits one call, the groups go whole, each contiguous and in order, in a call
  that halts at the first error (one request for a lone job's binds and unbinds); a halt caused by
  one group sends the others' commands again in the next call, as if nothing had happened to them;
- live events' commands go before backfill and reconcile ones; a call carrying only those leaves
  half of the burst to live events;
- a batch leaves as soon as the portal's bucket allows when it is full (counted as sent: reads of one
  kind merge into one list), or when every job of the batcher is waiting for it (nobody else could
  join), or after LINGER seconds; under a backlog the bucket is what holds calls back, and at each of
  its turns the kind that fills more of a call goes, with all of that kind that waits;
- what a call sends is a `BatchChunk` (app/bitrix/merge.py): a read several jobs ask goes once,
  and point reads of one kind (leads, the contacts made from them, the targets' checks) go as one
  list by `@ID` or `@LEAD_ID`, each job getting its own rows;
- each request is counted on every job whose commands it carried (`Meter`), and each command on its
  own job.

Each call is encoded and its answer unpacked by app/bitrix/batch_request.py, and leaves through the
portal's `PortalTransport` (app/bitrix/transport.py): the HTTP session, the rate limiter (in Redis,
so every process of an installation keeps one budget), the OAuth tokens, decoding, the error table
and retries. The batcher keeps the methods' time budgets' bookkeeping for
batches (what each command of a batch spent) and checks them before it packs a call.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from app.bitrix.batch_request import send_call
from app.bitrix.budget import MethodBudget
from app.bitrix.commands import BATCH_LIMIT, Answer, Command, CommandResult, Meter
from app.bitrix.errors import MethodBlocked
from app.bitrix.oauth import OAuthSession
from app.bitrix.guard import still_held
from app.bitrix.merge import BatchChunk, read_key
from app.bitrix.packing import BatchCall, Part
from app.bitrix.transport import REQUEST_TIMEOUT, Limiter, PortalTransport, RetryPolicy
from app.portal_config import PortalConfig

log = logging.getLogger(__name__)

LINGER = 0.05  # seconds a batch that is not full waits for the batcher's other jobs to join it
# A batch that is not full waits longer the busier the portal's bucket (up to this at a full one): on an
# idle portal a lone job's call leaves at once, under a backlog calls leave full instead of spending
# the burst on a few commands each.
BUSY_HOLD = 2.0
IN_FLIGHT = 4  # requests of one portal on their way at once (a slow answer does not stop the others)


class PortalBatcher:
    """Sends one portal's requests for every job of this process (see the module's docstring)."""

    def __init__(self, http: aiohttp.ClientSession, portal: PortalConfig, limiter: Limiter, *,
                 retry: RetryPolicy = RetryPolicy(), timeout: float = REQUEST_TIMEOUT,
                 budget: MethodBudget | None = None, oauth: OAuthSession | None = None,
                 linger: float = LINGER) -> None:
        self.portal = portal
        self.transport = PortalTransport(http, portal, limiter, retry=retry, timeout=timeout, budget=budget,
                                         oauth=oauth)
        self._limiter = limiter
        self._linger = linger
        self._parts: list[Part] = []
        self._active: dict[int, Meter] = {}
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self._in_flight = asyncio.Semaphore(IN_FLIGHT)
        self._checks_with_reads = False  # this round: write groups' reads travel with reads (`_travels_as_write`)

    # -------------------------------------------------------- what jobs call

    def join(self, meter: Meter) -> None:
        """A job starts using the batcher: a batch not yet full may wait for it to add its commands."""
        self._active[id(meter)] = meter

    def leave(self, meter: Meter) -> None:
        self._active.pop(id(meter), None)
        self._wake.set()

    async def read(self, meter: Meter, commands: Sequence[Command], *, low: bool = False) -> list[CommandResult]:
        """Run read commands, in batches shared with other jobs; results keep the commands' order."""
        if not commands:
            return []
        (results,) = await self._submit(Part(meter, [list(commands)], write=False, low=low))
        return results

    async def write(self, meter: Meter, stages: Sequence[Sequence[Command]], *, low: bool = False,
                    stops: Callable[[CommandResult], bool] | None = None) -> list[list[CommandResult]]:
        """Run a group of write stages: each stage only once every command before it succeeded (or was
        already done); after a failure the later stages come back NOT_RUN. Raises TransientError when a
        call's fate is unknown (a 5xx or a timeout): the writes may or may not have landed. `stops` says
        which results stop the group (by default any error but 'already so')."""
        part = Part(meter, [list(s) for s in stages], write=True, low=low, stops=stops)
        if not part.stages:
            return [[] for _ in stages]
        results = iter(await self._submit(part))
        return [next(results) if s else [] for s in stages]

    async def call(self, meter: Meter, method: str, params: dict[str, Any] | None = None, *,
                   write: bool = False, low: bool = False) -> Answer:
        """One method on its own request (for callers that need its `next` or `time`)."""
        if self.budget:
            await self.budget.check([method])
        meter.commands += 1
        return await self.transport.request(method, params or {}, write=write, meters=[meter],
                                            reserve=self._reserve(low))

    def take_calls(self) -> Counter[tuple[str, str, str]]:
        """Request outcomes since the last take: each request counted once, whichever jobs it carried."""
        return self.transport.take_calls()

    @property
    def requests(self) -> int:
        return self.transport.requests

    @property
    def budget(self) -> MethodBudget | None:
        """The methods' time budgets: checked before a call is packed, noted from every answer."""
        return self.transport.budget

    @budget.setter
    def budget(self, budget: MethodBudget | None) -> None:
        self.transport.budget = budget

    async def close(self) -> None:
        """The worker is stopping: cancel the calls on their way; jobs still waiting are cancelled."""
        tasks = [t for t in (self._sender, *self._deliveries) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for part in self._parts:
            part.done.cancel()
        self._parts.clear()

    async def _submit(self, part: Part) -> list[list[CommandResult]]:
        """Packs the part with this process's other jobs' parts waiting for the portal."""
        part.meter.waiting += 1
        self._parts.append(part)
        self._wake.set()
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_while_waiting())
        try:
            return await part.done
        finally:
            part.meter.waiting -= 1
            if part in self._parts and part.done.cancelled():
                self._parts.remove(part)  # a job cancelled meanwhile needs nothing more

    # -------------------------------------------------------- packing

    async def _send_while_waiting(self) -> None:
        try:
            await self._pack_and_send()
        except Exception as exc:  # the limiter's Redis failed, or a bug: the waiting jobs learn it, none hangs
            log.warning("portal %s: sending stopped: %s", self.portal.name, type(exc).__name__)
            for part in self._parts:
                part.finish(exc)

    async def _pack_and_send(self) -> None:
        while self._parts:
            self._wake.clear()
            self._parts = [p for p in self._parts if not p.done.done()]
            if not self._parts:
                break
            if not any(p.ready for p in self._parts):
                await self._wait(None)  # every part waits for a call on its way
                continue
            self._checks_with_reads = not self._groups_fit_one_call()
            write, full = self._next_kind()
            kind = [p for p in self._parts if p.ready and self._travels_as_write(p) == write]
            hold = (0.0 if self._everyone_waiting() else self._linger) + self._busy_hold()
            linger_left = hold - (time.monotonic() - min(p.queued_at for p in kind))
            if not full and linger_left > 0:
                await self._wait(linger_left)
                continue
            low = all(p.low for p in kind)
            if await self._defer_blocked():
                continue
            wait = await self._limiter.try_take(self.portal.name, self.portal.rate_limit.per_second,
                                                self.portal.rate_limit.burst, self._reserve(low))
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            await self._in_flight.acquire()
            held = await still_held(self._parts, self.portal.name) if write else None
            call = self._pack(write, held)
            if not call.slots:
                self._in_flight.release()
                continue
            task = asyncio.create_task(self._deliver(call))
            self._deliveries.add(task)
            task.add_done_callback(self._delivered)

    def _delivered(self, task: asyncio.Task[None]) -> None:
        self._deliveries.discard(task)
        self._in_flight.release()
        self._wake.set()

    async def _wait(self, timeout: float | None) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    def _next_kind(self) -> tuple[bool, bool]:
        """Whether writes go next, and whether what is waiting of that kind fills a call. Live work goes
        before low-priority; then the kind that carries more (at a portal's limit a request should carry
        all it can: the other kind's jobs meanwhile add to theirs); writes (which end jobs) on a tie."""
        for low in (False, True):
            kinds = [write for write in (True, False)
                     if any(p.ready and p.low == low and self._travels_as_write(p) == write for p in self._parts)]
            if kinds:
                sizes = {write: self._call_size(write) for write in kinds}
                write = max(kinds, key=lambda w: sizes[w])
                return write, sizes[write] >= BATCH_LIMIT
        return False, False

    def _call_size(self, write: bool) -> int:
        """The commands a call of this kind would send now, up to a full call (reads of one kind go as one
        list: 150 jobs' lead reads may be three commands)."""
        chunk = BatchChunk()
        for part in sorted((p for p in self._parts if p.ready and self._travels_as_write(p) == write),
                           key=lambda p: p.low):
            for command in part.stages[part.stage][part.sent:]:
                if not chunk.fits(command):
                    return BATCH_LIMIT
                chunk.add(command)
        return chunk.size

    def _groups_fit_one_call(self) -> bool:
        """Whether every write group waiting goes whole in one call (`_pack`): then a group's reads (the
        targets' checks) travel in it, one request for a lone job's checks and writes."""
        groups = [p for p in self._parts if p.write and p.ready]
        return all(p.out == 0 for p in groups) and sum(len(p.remaining()) for p in groups) <= BATCH_LIMIT

    def _travels_as_write(self, part: Part) -> bool:
        """A write group's stage that only reads (the targets' checks before its writes) travels with
        other jobs' reads when the groups do not fit one call: else it would take a request of its own,
        a few merged lists at the price of a call of 50."""
        if not part.write:
            return False
        if not self._checks_with_reads or part.stage >= part.until:
            return True
        return not all(read_key(command) is not None for command in part.stages[part.stage])

    def _busy_hold(self) -> float:
        levels: dict[str, float] = getattr(self._limiter, "levels", None) or {}
        burst = self.portal.rate_limit.burst
        if not self._linger or burst <= 2:  # a batcher of one-off commands never holds a call
            return 0.0
        return BUSY_HOLD * min(1.0, levels.get(self.portal.name, 0.0) / burst)

    def _everyone_waiting(self) -> bool:
        """True when no job of the batcher is busy elsewhere: nothing more will join this batch."""
        return all(meter.waiting for meter in self._active.values())

    async def _defer_blocked(self) -> bool:
        """Jobs needing a method that is out of its time budget (or all of them, when `batch` itself is)
        are told to come back when it resets; the others' commands still go. True if any was told."""
        if not self.budget:
            return False
        await self.budget.refresh()
        told = False
        for part in self._parts:
            if part.ready and part.out == 0:
                blocked = self.budget.blocked(["batch", *(part.command(at).method for at in part.remaining())])
                if blocked is not None:
                    part.finish(blocked)
                    told = True
        return told

    def _reserve(self, low: bool) -> int:
        """Slots of the burst a call leaves free: a backfill or reconcile call leaves half to live events."""
        return self.portal.rate_limit.burst // 2 if low else 0

    def _pack(self, write: bool, held: set[int] | None = None) -> BatchCall:
        """`held`: the jobs whose writes may go (`still_held`); None: every job's."""
        parts = sorted((p for p in self._parts if p.ready and self._travels_as_write(p) == write
                        and (held is None or id(p.meter) in held)), key=lambda p: p.low)
        if write:
            whole = [p for p in parts if p.out == 0]
            if whole and len(whole) == len(parts) and sum(len(p.remaining()) for p in whole) <= BATCH_LIMIT:
                # Everything waiting fits one call: the groups go whole, in a call that halts at an error.
                call = BatchCall(write=True, halt=any(p.until - p.stage > 1 for p in whole))
                call.chunk.merge = not call.halt
                for part in whole:
                    for at in part.remaining():
                        call.take(part, at)
                    part.stage, part.sent = part.until, 0
                    part.out += 1
                return call
        call = BatchCall(write=write, halt=False)
        for part in parts:
            took = False
            stage = part.stages[part.stage]
            # A command that does not fit ends this part's share; another part's may still fit (it is
            # a read already in the call, or joins a list of its kind).
            while part.sent < len(stage) and call.chunk.fits(stage[part.sent]):
                call.take(part, (part.stage, part.sent))
                part.sent += 1
                took = True
            if took:
                part.out += 1
        return call

    # -------------------------------------------------------- delivering

    async def _deliver(self, call: BatchCall) -> None:
        parts = list(dict.fromkeys(part for part, _ in call.slots))
        try:
            results = await send_call(self.transport, self.budget, call, parts, self._reserve(call.low))
        except asyncio.CancelledError:
            for part in parts:
                part.done.cancel()
            raise
        except Exception as exc:  # every job of the call learns what went wrong, as if it had called alone
            for part in parts:
                part.out -= 1
                part.finish(exc)
            return
        requeue: list[Part] = []
        halted = False
        for (part, at), result in zip(call.slots, results):
            if part.done.done():
                continue
            if halted:  # stopped by the halt: its unsent commands go again
                if part not in requeue:
                    requeue.append(part)
                    part.stage, part.sent = at
                continue
            part.results[at[0]][at[1]] = result
            if isinstance(result.error, MethodBlocked):
                part.finish(result.error)
            elif part.stops(result):
                part.until = min(part.until, at[0] + 1)
            halted = call.halt and result.error is not None
            if halted and not part.done.done():  # the rest of its group goes again (unless it failed)
                requeue.append(part)
                part.stage, part.sent = at[0], at[1] + 1
        for part in parts:
            part.out -= 1
            if part.done.done():
                continue
            if part in requeue:
                part.queued_at = time.monotonic() - self._linger  # first in line, no more waiting
            self._advance(part)

    def _advance(self, part: Part) -> None:
        """A stage whose every command came back lets the next one go; a failed command's stage is its
        group's last (the other commands of that stage still run: they do not depend on each other)."""
        if part.out:
            return
        if part.stage < part.until and part.sent >= len(part.stages[part.stage]):
            part.stage, part.sent = part.stage + 1, 0
        if part.stage >= part.until:
            part.finish()
