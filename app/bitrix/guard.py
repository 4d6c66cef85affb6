"""The write guard: just before a call carrying writes is packed, each job whose writes it would carry
shows it still holds its lead's lock (its meter's `guard`, a redis-py `Lock.owned()` behind it). A job
that cannot is told `NotHeld`, and none of its writes leave (docs/architecture.md, "Locks")."""
from __future__ import annotations

import asyncio
import logging

from app.bitrix.packing import Part

log = logging.getLogger(__name__)

GUARD_TIMEOUT = 2.0  # seconds for the jobs' lock checks before a write call; past it the writes are not sent


class NotHeld(Exception):
    """A job's writes were not sent: it no longer holds its lock (its process was paused past the lease,
    or Redis lost the lock); another job may be on the lead now. The job runs again later."""


async def still_held(parts: list[Part], portal: str) -> set[int]:
    """Just before a write call is packed: the jobs (their meters' ids) whose writes may go, each
    having shown it still holds its lock. The others' parts end with `NotHeld`, unsent."""
    meters = list(dict.fromkeys(p.meter for p in parts if p.write and p.ready and p.meter.guard))
    held = {id(p.meter) for p in parts if p.meter.guard is None}
    if not meters:
        return held
    try:
        async with asyncio.timeout(GUARD_TIMEOUT):
            answers = await asyncio.gather(*(m.guard() for m in meters if m.guard), return_exceptions=True)
    except TimeoutError:
        answers = [False] * len(meters)
    for meter, answer in zip(meters, answers):
        if answer is True:
            held.add(id(meter))
            continue
        why = "its lock could not be checked" if isinstance(answer, BaseException) else "its lock had lapsed"
        log.warning("portal %s: a job's writes were not sent: %s", portal, why)
        for part in parts:
            if part.meter is meter and part.write:
                part.finish(NotHeld(f"writes not sent: {why} (the process was paused past its lease, or "
                                    "Redis lost it); another job may be on the lead"))
    return held
