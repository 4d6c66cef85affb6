"""The one way to reach a portal, for jobs, undo, backfill, `rules explain` and `doctor` alike.

Built anywhere else, a portal's session misses what the worker's has: an application (OAuth) portal's
tokens, which the portal wants on every call, and the request budget every process of an
installation shares in Redis.
"""
from __future__ import annotations

import aiohttp
from redis.asyncio import Redis

from app.bitrix.budget import BudgetReads, MethodBudget
from app.bitrix.client import RestClient
from app.bitrix.oauth import OAuthSession
from app.portal_config import PortalConfig
from app.bitrix.ratelimit import LocalRateLimiter, RateLimiter
from app.bitrix.batcher import LINGER, PortalBatcher
from app.bitrix.transport import REQUEST_TIMEOUT, Limiter, RetryPolicy


def portal_batcher(http: aiohttp.ClientSession, portal: PortalConfig, redis: Redis | None, *,
                   limiter: Limiter | None = None, retry: RetryPolicy = RetryPolicy(),
                   timeout: float = REQUEST_TIMEOUT, budget_reads: BudgetReads | None = None,
                   linger: float = LINGER) -> PortalBatcher:
    """The portal's sender. With Redis: the installation's shared request budget (or `limiter`), the
    methods' time budgets, and for an application its tokens, refreshed once for every process.
    Without Redis (a tool reading a webhook portal, which needs
    no Redis): a budget of this process's own."""
    if redis is None:
        if portal.auth == "oauth":
            raise ValueError(f"portal {portal.name} is an application, whose tokens are in Redis: pass Redis")
        return PortalBatcher(http, portal, limiter or LocalRateLimiter(), retry=retry, timeout=timeout,
                             linger=linger)
    return PortalBatcher(http, portal, limiter or RateLimiter(redis), retry=retry, timeout=timeout, linger=linger,
                         budget=MethodBudget(redis, portal.name, portal.operating_budget,
                                             budget_reads or BudgetReads()),
                         oauth=OAuthSession(http, redis, portal) if portal.auth == "oauth" else None)


def portal_client(http: aiohttp.ClientSession, portal: PortalConfig, redis: Redis | None, *,
                  retry: RetryPolicy = RetryPolicy(), timeout: float = REQUEST_TIMEOUT,
                  low_priority: bool = False) -> RestClient:
    """A tool's client (undo, backfill, explain, doctor) on a batcher of its own: its commands are
    sent at once, with nobody else's to wait for."""
    return RestClient.joining(portal_batcher(http, portal, redis, retry=retry, timeout=timeout, linger=0.0),
                              low_priority=low_priority)
