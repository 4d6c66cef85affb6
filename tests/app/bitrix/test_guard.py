"""The write guard (app/bitrix/guard.py): before a call carrying writes is packed, every job in it shows
it still holds its lead's lock, or none of its writes leave. Jobs' locks for real (redis-py's) are in
test_batcher.py and tests/workers; here each way a check can answer."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from app.bitrix.commands import Command, Meter
from app.bitrix.guard import NotHeld, still_held
from app.bitrix.packing import Part

WRITE = [Command("crm.activity.binding.add", {"activityId": 1})]


def job(guard: Callable[[], Awaitable[bool]] | None) -> Part:
    return Part(Meter(guard=guard), [list(WRITE)], write=True, low=False)


async def holds() -> bool:
    return True


async def lapsed() -> bool:
    return False


async def unreachable() -> bool:
    raise ConnectionError("Redis is away")


async def test_only_the_jobs_that_still_hold_their_locks_may_send_their_writes() -> None:
    held, gone, unknown, unguarded = job(holds), job(lapsed), job(unreachable), job(None)
    parts = [held, gone, unknown, unguarded]

    allowed = await still_held(parts, "acme")

    assert allowed == {id(held.meter), id(unguarded.meter)}
    for part, why in ((gone, "its lock had lapsed"), (unknown, "its lock could not be checked")):
        with pytest.raises(NotHeld, match=why):
            await asyncio.wait_for(part.done, 1)
    assert not held.done.done() and not unguarded.done.done()


async def test_a_check_that_does_not_answer_in_time_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("app.bitrix.guard.GUARD_TIMEOUT", 0.05)
    never = asyncio.Event()

    async def hangs() -> bool:
        await never.wait()
        return True

    part = job(hangs)
    assert await still_held([part], "acme") == set()
    with pytest.raises(NotHeld):
        await asyncio.wait_for(part.done, 1)
