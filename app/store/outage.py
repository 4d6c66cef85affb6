"""Riding out a Redis outage: say once that Redis went, once that it is back, and wait in between.

Each long-running part (the worker's poll, the web process's watch, `jobs watch`) keeps one of these:
a failed round trip calls `down`, a good one `up`. The log gets one WARNING when Redis goes and one
INFO when it is back, with how long it was away; `/readyz` shows the outage while it lasts.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time

log = logging.getLogger(__name__)

FIRST_WAIT = 0.2  # seconds before the first look after a failure; doubled each time, with jitter
LONGEST_WAIT = 5.0


class RedisOutage:
    def __init__(self, who: str, logger: logging.Logger = log) -> None:
        self.who = who
        self._log = logger
        self._since: float | None = None  # monotonic time of the first failure
        self._failures = 0
        self.last_error = ""

    @property
    def down_for(self) -> float | None:
        """Seconds since Redis was first found away; None while it answers."""
        return None if self._since is None else time.monotonic() - self._since

    def down(self, exc: BaseException) -> None:
        self.last_error = type(exc).__name__
        self._failures += 1
        if self._since is None:
            self._since = time.monotonic()
            self._log.warning("%s: Redis is unreachable (%s); waiting for it, nothing accepted is lost",
                              self.who, describe(exc))

    def up(self) -> None:
        if self._since is not None:
            self._log.info("%s: Redis is back after %.1f s", self.who, time.monotonic() - self._since)
            self._since, self._failures = None, 0

    def next_wait(self) -> float:
        """Bounded exponential backoff with jitter: many processes do not all knock at once."""
        longest = min(LONGEST_WAIT, FIRST_WAIT * 2.0 ** min(self._failures, 10))
        return longest * random.uniform(0.5, 1.0)

    async def wait(self) -> None:
        await asyncio.sleep(self.next_wait())

    def status(self) -> str:
        """For /readyz: "ok", or how long Redis has been away."""
        down_for = self.down_for
        return "ok" if down_for is None else f"unreachable ({self.last_error}) for {down_for:.0f} s"


def describe(exc: BaseException) -> str:
    """The error in one short line: its kind, and what redis-py says (an address, never a password)."""
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
