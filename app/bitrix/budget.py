"""Each method's server-time budget, shared by every process through Redis.

A portal sums the server time of each method over ten minutes; past its budget (480 s in the
documentation's example) it answers HTTP 429 OPERATION_TIME_LIMIT for that method only. Every
answer's `time` block says how much a method has used (`operating`) and when the oldest minute drops
out (`operating_reset_at`); a method near its budget is left alone until then, and the jobs that need
it are deferred instead of blocking a worker.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from redis.asyncio import Redis

from app.bitrix.commands import Answer, Command
from app.bitrix.errors import MethodBlocked
from app.store.namespace import prefixed
from app.store.redis_typing import awaited

NEAR = 0.8  # of the budget: stop early, since the call that crosses it is itself cut off
WORTH_SHARING = 0.25  # of the budget: below it a method is far from blocking, and nothing is written
WINDOW = 600
FRESH_FOR = 1.0  # seconds a process reuses what it read; budgets move over minutes


Known = dict[str, tuple[float, float]]  # method -> (operating, reset_at)


class BudgetReads:
    """What a process last read of each portal's budgets, shared by its jobs for FRESH_FOR seconds.

    A worker runs hundreds of short jobs a second; each reading the hash itself would cost a Redis
    round trip per job for figures that change over minutes.
    """

    def __init__(self) -> None:
        self._reads: dict[str, tuple[float, Known]] = {}

    async def known(self, redis: Redis, key: str) -> Known:
        read_at, known = self._reads.get(key, (0.0, {}))
        if time.monotonic() - read_at > FRESH_FOR:
            stored = await awaited(redis.hgetall(key))
            known = {name.decode(): _parse(value) for name, value in stored.items()}
            self._reads[key] = (time.monotonic(), known)
        return dict(known)

    def forget(self, key: str) -> None:
        self._reads.pop(key, None)


class MethodBudget:
    """A process's view of one portal's method budgets: read from Redis at most once a FRESH_FOR seconds,
    written when it matters."""

    def __init__(self, redis: Redis, portal: str, limit: float, reads: BudgetReads | None = None) -> None:
        self._redis = redis
        self._reads = reads or BudgetReads()
        self._key = prefixed(f"b24:operating:{portal}")
        self._limit = limit
        self._known: Known | None = None

    async def note(self, method: str, timing: Any) -> None:
        """Remember what an answer's `time` block (or a batch's per-command one) reports."""
        if not isinstance(timing, dict) or float(timing.get("operating") or 0) < WORTH_SHARING * self._limit:
            return
        reset_at = parse_reset_at(timing.get("operating_reset_at")) or time.time() + WINDOW
        await self._share(method, float(timing["operating"]), reset_at)

    async def _share(self, method: str, operating: float, reset_at: float) -> None:
        if self._known is not None:
            self._known[method] = (operating, reset_at)
        self._reads.forget(self._key)  # this process's next job reads what was just written
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(self._key, method, f"{operating}|{reset_at}")
            pipe.expire(self._key, WINDOW)
            await pipe.execute()

    async def note_batch(self, chunk: Sequence[Command], answer: Answer) -> None:
        """Each command spends its own method's budget, as its `result_time` says; on portals that charge
        a batch's time to `batch` itself, every command carries the batch's one figure, which is noted
        once, for `batch`, rather than as each method's own."""
        await self.note("batch", answer.time)
        times = answer.result.get("result_time") if isinstance(answer.result, dict) else None
        if not isinstance(times, dict):
            return
        batch_wide = answer.time.get("operating") if isinstance(answer.time, dict) else None
        for i, command in enumerate(chunk):
            timing = times.get(f"c{i}")
            if isinstance(timing, dict) and batch_wide and timing.get("operating") == batch_wide:
                continue
            await self.note(command.method, timing)

    async def block(self, method: str, reset_at: float | None = None) -> float:
        """The portal refused the method: treat its budget as spent until it resets; returns when."""
        stored: bytes | str | None = await awaited(self._redis.hget(self._key, method))  # bytes, in fact
        text = stored.decode() if isinstance(stored, bytes) else stored
        known = float(text.split("|")[1]) if text else 0.0
        until = reset_at or (known if known > time.time() else time.time() + 60)
        await self._share(method, self._limit, until)
        return until

    async def refresh(self) -> None:
        """Take in what other processes shared (read at most once a FRESH_FOR seconds per process)."""
        self._known = await self._reads.known(self._redis, self._key)

    def blocked(self, methods: Iterable[str]) -> MethodBlocked | None:
        """The first method near its budget and not yet reset, as the error a job defers on."""
        now = time.time()
        for method in dict.fromkeys(methods):
            operating, reset_at = (self._known or {}).get(method, (0.0, 0.0))
            if operating >= NEAR * self._limit and reset_at > now:
                return MethodBlocked(method, "OPERATION_TIME_LIMIT",
                                     f"{operating:.0f} s of {self._limit:.0f} s used", retry_at=reset_at)
        return None

    async def check(self, methods: Iterable[str]) -> None:
        """Raise MethodBlocked for the first method that is near its budget and not yet reset."""
        await self.refresh()
        blocked = self.blocked(methods)
        if blocked is not None:
            raise blocked


def _parse(stored: bytes) -> tuple[float, float]:
    operating, reset_at = stored.decode().split("|")
    return float(operating), float(reset_at)


def parse_reset_at(value: Any) -> float | None:
    """A unix time, or in some answers an ISO string."""
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        pass
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None
