"""Waiting on a condition, with a deadline: the one way tests order events (never a fixed sleep)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


async def until(check: Callable[[], bool | Awaitable[bool]], timeout: float, what: str,
                every: float = 0.05) -> float:
    """Poll `check` (plain or async) until it holds; fail naming `what` after `timeout` seconds.
    Returns how long it took."""
    started = time.monotonic()
    while True:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"timed out after {timeout:g} s waiting for {what}"
        await asyncio.sleep(every)
