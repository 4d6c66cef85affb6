"""RestClient: one job's (or one command's) way to a portal, through the portal's PortalBatcher.

The batcher (app/bitrix/batcher.py) packs every job's commands into shared batches and sends each
through the portal's transport (app/bitrix/transport.py: URL, OAuth, decoding, errors, retries); a RestClient hands it this job's commands and counts what they cost this job.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from app.bitrix.budget import MethodBudget
from app.bitrix.commands import BATCH_LIMIT, PAGE_SIZE, Answer, Command, CommandResult, Meter
from app.bitrix.oauth import OAuthSession
from app.portal_config import PortalConfig
from app.bitrix.packing import unpack_batch
from app.bitrix.batcher import PortalBatcher
from app.bitrix.transport import REQUEST_TIMEOUT, Limiter, RetryPolicy, answer_of, int_or_none

__all__ = ["BATCH_LIMIT", "PAGE_SIZE", "Answer", "Command", "CommandResult", "RestClient", "RetryPolicy",
           "answer_of", "fast_page", "int_or_none", "unpack_batch"]


class RestClient:
    """Calls one portal for one job. Reads are retried on transient failures; a write is re-sent only
    after the portal refused it for the rate limit (then nothing ran): after a 5xx or a timeout the
    caller re-reads instead.

    Made alone (`RestClient(http, portal, limiter)`) it has a batcher of its own, for one-off commands;
    a worker's jobs join the portal's shared batcher with `RestClient.joining`.
    """

    def __init__(self, http: aiohttp.ClientSession, portal: PortalConfig, limiter: Limiter, *,
                 retry: RetryPolicy = RetryPolicy(), timeout: float = REQUEST_TIMEOUT, low_priority: bool = False,
                 budget: MethodBudget | None = None, oauth: OAuthSession | None = None) -> None:
        self._setup(PortalBatcher(http, portal, limiter, retry=retry, timeout=timeout, budget=budget, oauth=oauth,
                                  linger=0.0), low_priority)

    @classmethod
    def joining(cls, batcher: PortalBatcher, *, low_priority: bool = False) -> RestClient:
        """A job's client on a shared batcher; `close` it when the job ends."""
        client = cls.__new__(cls)
        client._setup(batcher, low_priority)
        batcher.join(client.meter)
        return client

    def _setup(self, batcher: PortalBatcher, low_priority: bool) -> None:
        self.batcher = batcher
        self.portal = batcher.portal
        # Low-priority work (backfill, reconcile) goes after live events and leaves them half the burst.
        self.low_priority = low_priority
        self.meter = Meter()

    @property
    def requests(self) -> int:
        """Requests that carried this job's commands (a request shared by three jobs counts on each)."""
        return self.meter.requests

    @property
    def commands(self) -> int:
        return self.meter.commands

    def take_calls(self) -> Counter[tuple[str, str, str]]:
        """For metrics: this job's commands, and the batcher's requests not yet counted (each once)."""
        calls, self.meter.calls = self.meter.calls, Counter()
        return calls + self.batcher.take_calls()

    def close(self) -> None:
        self.batcher.leave(self.meter)

    async def call(self, method: str, params: dict[str, Any] | None = None, *, write: bool = False) -> Answer:
        """One method on a request of its own (a page whose `next` or `time` the caller needs)."""
        return await self.batcher.call(self.meter, method, params, write=write, low=self.low_priority)

    async def batch(self, commands: Sequence[Command], *, write: bool = False) -> list[CommandResult]:
        """Run commands (in as many batches of 50 as they need, shared with other jobs); results keep
        the commands' order. Writes here do not depend on each other: see `write` for ordered ones."""
        if write:
            (results,) = await self.write([commands])
            return results
        return await self.batcher.read(self.meter, commands, low=self.low_priority)

    async def write(self, stages: Sequence[Sequence[Command]], *,
                    stops: Callable[[CommandResult], bool] | None = None) -> list[list[CommandResult]]:
        """Write in stages: each only after every command of the one before succeeded (or was already
        done); after a failure (as `stops` judges it) the later stages come back NOT_RUN."""
        return await self.batcher.write(self.meter, stages, low=self.low_priority, stops=stops)

    async def list_all(self, method: str, filter: dict[str, Any] | None = None,
                       select: Sequence[str] = (), *, after_id: int = 0) -> list[dict[str, Any]]:
        """Every row of a list, in the fast form: ordered by ID, `>ID` paging, no count query."""
        rows: list[dict[str, Any]] = []
        while True:
            page = (await self.call(method, fast_page(filter, select, after_id))).result or []
            rows.extend(page)
            if len(page) < PAGE_SIZE:
                return rows
            after_id = int(page[-1]["ID"])


def fast_page(filter: dict[str, Any] | None, select: Sequence[str], after_id: int) -> dict[str, Any]:
    params: dict[str, Any] = {"order": {"ID": "ASC"}, "filter": {**(filter or {}), ">ID": after_id}, "start": -1}
    if select:
        params["select"] = list(select)
    return params
