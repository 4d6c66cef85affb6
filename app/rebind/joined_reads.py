"""Key reads of a worker's concurrent jobs, sent to Redis as one MGET.

Jobs that shared a call to their portal (`app/bitrix/session.py`) get its answer in the same turn of
the event loop, and most go straight on to the loop guard, which reads a counter per activity. Each
job reading its own would cost it a round trip (about 6 % of a short job's CPU); read together, the
jobs resumed in one turn of the loop share one.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from redis.asyncio import Redis


@dataclass
class _Read:
    keys: list[str]
    done: asyncio.Future[list[bytes | None]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class JoinedReads:
    """One per worker process: every job's reads go through it."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._waiting: list[_Read] = []
        self._sender: asyncio.Task[None] | None = None
        self._senders: set[asyncio.Task[None]] = set()  # with their MGET on its way too
        self.mgets = 0  # for tests

    async def get(self, keys: list[str]) -> list[bytes | None]:
        """The keys' values, in order (None for a missing key), as MGET returns them."""
        if not keys:
            return []
        read = _Read(list(keys))
        self._waiting.append(read)
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())
            self._senders.add(self._sender)
            self._sender.add_done_callback(self._sender_ended)
        return await read.done

    async def close(self) -> None:
        """The worker is stopping: no read is left on its way."""
        for sender in list(self._senders):
            sender.cancel()
        await asyncio.gather(*self._senders, return_exceptions=True)

    async def _send(self) -> None:
        reads: list[_Read] = []
        try:
            await asyncio.sleep(0)  # the jobs resumed in this turn of the loop add their keys
            reads, self._waiting, self._sender = self._waiting, [], None
            live = [read for read in reads if not read.done.done()]  # a job cancelled meanwhile needs nothing
            if live:
                self.mgets += 1
                values = await self._redis.mget([key for read in live for key in read.keys])
                start = 0
                for read in live:
                    if not read.done.done():
                        read.done.set_result(values[start:start + len(read.keys)])
                    start += len(read.keys)
        except Exception as exc:  # every job learns what went wrong, as if it had read alone
            for read in reads:
                if not read.done.done():
                    read.done.set_exception(exc)
        except asyncio.CancelledError:  # the worker is stopping: nobody waits for an answer that won't come
            for read in reads:
                read.done.cancel()
            raise

    def _sender_ended(self, sender: asyncio.Task[None]) -> None:
        self._senders.discard(sender)
        if self._sender is sender:  # cancelled before it took the reads (perhaps before it ever ran)
            reads, self._waiting, self._sender = self._waiting, [], None
            for read in reads:
                read.done.cancel()
